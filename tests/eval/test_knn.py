"""Weighted kNN: accuracy on toy data, a literal transcription of the vote, chunking, 2-rank gathering."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from fastcl.eval.knn import extract_features, knn_classify, knn_eval


def clusters(n_per_class: int, num_classes: int = 10, dim: int = 32, noise: float = 0.3, seed: int = 0):
    """Gaussian blobs around fixed random centres (always drawn from seed 0); ``seed`` picks the noise."""
    centres = F.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0)), dim=1) * 3
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + noise * torch.randn(len(y), dim, generator=torch.Generator().manual_seed(seed + 1))
    return x, y


def knn_reference(train_x, train_y, test_x, test_y, k, T, num_classes):
    """Literal float64 transcription of the InstDisc vote, one query at a time: cosine similarity to every
    training row, keep the k largest, add exp(s/T) to each neighbour's class, rank the class totals.
    Returns the number of top-1 and top-5 hits."""
    train_x, test_x = train_x.double().tolist(), test_x.double().tolist()
    top1 = top5 = 0
    for q, y in zip(test_x, test_y.tolist()):
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for j, t in enumerate(train_x):
            tn = math.sqrt(sum(v * v for v in t))
            sims.append((sum(a * b for a, b in zip(q, t)) / (qn * tn), j))
        sims.sort(reverse=True)
        votes = [0.0] * num_classes
        for s, j in sims[:k]:
            votes[int(train_y[j])] += math.exp(s / T)
        ranked = sorted(range(num_classes), key=lambda c: votes[c], reverse=True)
        top1 += ranked[0] == y
        top5 += y in ranked[:5]
    return top1, top5


def test_separable_clusters():
    x, y = clusters(60)
    xt, yt = clusters(20, seed=1)  # same centres, fresh noise
    res = knn_classify(x, y, xt, yt, k=200, T=0.1)
    assert res["top1"] >= 0.99 and res["top5"] >= 0.99


def test_random_labels_near_chance():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    y, yt = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    res = knn_classify(x, y, xt, yt, k=200, T=0.1)
    # chance is 0.1 / 0.5; 1000 queries give a binomial std of ~0.01 / ~0.016: 5 and 5 sigma
    assert abs(res["top1"] - 0.1) < 0.05
    assert abs(res["top5"] - 0.5) < 0.08


@pytest.mark.parametrize("n_train, n_test, dim, num_classes, k, T", [
    (120, 40, 16, 10, 20, 0.1),
    (33, 17, 5, 3, 50, 0.5),  # weird shapes: k > N (capped at N), fewer than 5 classes (top-5 = top-3)
])
def test_matches_literal_vote(n_train, n_test, dim, num_classes, k, T):
    g = torch.Generator().manual_seed(n_train)
    # Overlapping classes around shared directions: neighbourhoods are informative but mixed, so the
    # weights (not just a majority) decide many queries.
    centres = torch.randn(num_classes, dim, generator=g)
    y = torch.randint(0, num_classes, (n_train,), generator=g)
    yt = torch.randint(0, num_classes, (n_test,), generator=g)
    x = centres[y] + 1.5 * torch.randn(n_train, dim, generator=g)
    xt = centres[yt] + 1.5 * torch.randn(n_test, dim, generator=g)
    ref1, ref5 = knn_reference(x, y, xt, yt, min(k, n_train), T, num_classes)
    assert 0 < ref1 < n_test  # the case is not degenerate
    res = knn_classify(x.double(), y, xt.double(), yt, k=k, T=T, num_classes=num_classes)
    assert round(res["top1"] * n_test) == ref1 and round(res["top5"] * n_test) == ref5
    # fp32 input: same counts (the vote margins here are far above fp32 rounding)
    res32 = knn_classify(x, y, xt, yt, k=k, T=T, num_classes=num_classes)
    assert res32 == res


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunking_is_exact(chunk):
    g = torch.Generator().manual_seed(3)
    x, xt = torch.randn(500, 24, generator=g), torch.randn(130, 24, generator=g)
    y, yt = torch.randint(0, 10, (500,), generator=g), torch.randint(0, 10, (130,), generator=g)
    x[:, 0] += y * 0.5  # some signal so the accuracies are not all near chance
    xt[:, 0] += yt * 0.5
    full = knn_classify(x.double(), y, xt.double(), yt, k=50, chunk=None)
    assert knn_classify(x.double(), y, xt.double(), yt, k=50, chunk=chunk) == full


def test_bad_hyperparameters():
    x, y = clusters(2)
    with pytest.raises(ValueError, match="k must be"):
        knn_classify(x, y, x, y, k=0)
    with pytest.raises(ValueError, match="T must be"):
        knn_classify(x, y, x, y, T=0.0)
    with pytest.raises(ValueError, match="chunk"):
        knn_classify(x, y, x, y, chunk=0)


# ============ extraction ============
class Flatten(nn.Module):
    """Deterministic toy backbone with a train/eval difference (dropout) to check the mode is handled."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):  # (B, 3, H, W) -> (B, 3*H*W)
        return self.drop(x.flatten(1))


def toy_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 4, (n,), generator=g)


def batches(images, labels, idx, bs, views=False):
    out = []
    for i in range(0, len(idx), bs):
        j = torch.tensor(idx[i:i + bs])
        im = images[j]
        out.append(([im, im * 0] if views else im, labels[j], j))
    return out


def test_extract_features_single_process():
    images, labels = toy_images(10)
    net = Flatten().train()
    order = [3, 1, 4, 9, 0, 5, 2, 6, 8, 7, 3]  # shuffled, with one repeat
    f, y = extract_features(net, batches(images, labels, order, 4, views=True), "cpu")
    assert net.training  # restored
    torch.testing.assert_close(f, images.flatten(1))  # index order, deduplicated, first view, no dropout
    assert torch.equal(y, labels)
    # (images, labels) batches without indices: loader order kept
    f2, y2 = extract_features(net, [(images[:6], labels[:6]), (images[6:], labels[6:])], "cpu")
    torch.testing.assert_close(f2, images.flatten(1))
    assert torch.equal(y2, labels)


def test_knn_eval_restores_eval_mode_and_runs():
    images, labels = toy_images(20)
    net = Flatten().eval()
    res = knn_eval(net, batches(images, labels, list(range(20)), 8), batches(images, labels, list(range(20)), 8),
                   "cpu", k=1)
    assert not net.training
    assert res["top1"] == 1.0  # each image's nearest neighbour is itself


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, q):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, labels = toy_images(11)
        # uneven, shuffled split: rank 0 holds 7 rows (index 0 twice, as a padding sampler repeats),
        # rank 1 holds 5; together they cover the 11 indices
        shards = {0: [10, 2, 0, 8, 5, 6, 0], 1: [9, 1, 3, 4, 7]}
        train = batches(images, labels, shards[rank], 3)
        f, y = extract_features(Flatten().train(), train, "cpu")
        seen = sorted(set(shards[0]) | set(shards[1]))
        ok_feats = torch.equal(f, images[seen].flatten(1)) and torch.equal(y, labels[seen])
        # distributed kNN (test rows split across ranks, counts all-reduced) == single-process kNN
        val = batches(images, labels, shards[rank], 2)
        res = knn_eval(Flatten(), train, val, "cpu", k=3)
        ref = knn_classify(images[seen].flatten(1), labels[seen], images[seen].flatten(1), labels[seen], k=3,
                           num_classes=int(labels[seen].max()) + 1)
        q.put((rank, ok_feats, seen, res, ref))
    finally:
        dist.destroy_process_group()


def test_extract_features_two_ranks_gloo():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_dist_worker, args=(2, _free_port(), q), nprocs=2, join=True, start_method="spawn")
    out = sorted(q.get(timeout=30) for _ in range(2))
    for rank, ok_feats, seen, res, ref in out:
        assert seen == list(range(11)), seen
        assert ok_feats, f"rank {rank}: gathered features not in index order / not deduplicated"
        assert res == ref, (rank, res, ref)
