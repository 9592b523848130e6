"""Concurrent mixed-task forwards on one RecastModel: each call returns exactly what it returns
alone (the routing travels with the call, not on the shared modules)."""

import threading

import pytest
import torch

from tests.test_multitask import CLASSES, _resnet, _vit, _with_tasks

TASKS = ["pretrained", *CLASSES]
THREADS, CALLS = 8, 6


def _requests(seed: int, count: int) -> list[tuple[torch.Tensor, list[str]]]:
    """Batches of 1-9 rows with different task mixes (one task, two, all four)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        rows = int(torch.randint(1, 10, (1,), generator=g))
        mix = TASKS[: int(torch.randint(1, len(TASKS) + 1, (1,), generator=g))]
        tasks = [mix[int(i)] for i in torch.randint(0, len(mix), (rows,), generator=g)]
        out.append((torch.randn(rows, 3, 32, 32, generator=g), tasks))
    return out


def _concurrent(rc, per_thread):
    """Run each thread's requests at once (released together); returns outputs or raises."""
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(per_thread))

    def work(k):
        try:
            start.wait()
            with torch.no_grad():
                results[k] = [rc(x, tasks=tasks) for x, tasks in per_thread[k]]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(per_thread))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("strategy", ["auto", "loop"])
@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_concurrent_mixed_forwards_are_each_bit_identical_to_alone(request, arch, strategy):
    if arch == "vit":
        rc = _vit(request.getfixturevalue("tiny_vit"), "recast_att_mlp")
    else:
        rc = _resnet(request.getfixturevalue("tiny_resnet"), bn_stats="per_task")
    # per-task biases and norms (and BatchNorm statistics): every kind of routed tensor
    rc = _with_tasks(rc, train_biases=True, train_norms=True).eval()
    rc.mixed_strategy = strategy  # "loop": one single-task routing per task, each thread its own
    per_thread = [_requests(100 + k, CALLS) for k in range(THREADS)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one intra-op thread per forward (the same for alone and concurrent)
    try:
        with torch.no_grad():
            alone = [[rc(x, tasks=tasks) for x, tasks in reqs] for reqs in per_thread]
        for _ in range(2):
            got = _concurrent(rc, per_thread)
            wrong = sum(not torch.equal(a, b) for k in range(THREADS) for a, b in zip(alone[k], got[k]))
            assert wrong == 0, f"{wrong} of {THREADS * CALLS} concurrent calls differ from the same call alone"
    finally:
        torch.set_num_threads(threads)
    assert rc.active_task == "a"  # nothing switched
    if strategy == "loop":  # the calls did run the loop
        x, tasks = next(r for reqs in per_thread for r in reqs if len(set(r[1]) - {"a"}) >= 2)
        with torch.no_grad():
            rc(x, tasks=tasks)
        assert set(rc.last_routing.picks.values()) == {"loop"}


def test_last_routing_is_per_thread(tiny_vit):
    rc = _with_tasks(_vit(tiny_vit, "recast_mlp")).eval()
    x = torch.randn(4, 3, 32, 32)
    seen = {}

    def other():
        seen["before"] = rc.last_routing
        with torch.no_grad():
            rc(x, tasks=["b", "c", "b", "c"])
        seen["after"] = rc.last_routing.tasks

    with torch.no_grad():
        rc(x, tasks=["a", "b", "a", "b"])
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == {"before": None, "after": ["b", "c"]}
    assert rc.last_routing.tasks == ["a", "b"]  # this thread's own last forward
