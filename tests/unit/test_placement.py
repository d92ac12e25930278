"""Placement of a mesh's workers on GPUs (``pdmesh up``): exact plans, memory shares, fit checks."""

import pytest

from pdmesh.placement import PlacementError, WorkerPlacement, check_fit, memory_needed, parse_devices, plan

GiB = 1 << 30


def where(p: list[WorkerPlacement]) -> dict[str, tuple]:
    return {w.name: (w.devices, w.gpu_memory_utilization) for w in p}


def test_default_spreads_workers_over_the_visible_gpus():
    assert where(plan({"prefill": 1, "decode": 1}, 2)) == {"prefill-0": ((0,), 0.9), "decode-0": ((1,), 0.9)}
    # one GPU: both share it, half of the mesh's fraction each
    assert where(plan({"prefill": 1, "decode": 1}, 1)) == {"prefill-0": ((0,), 0.45), "decode-0": ((0,), 0.45)}
    # 2P2D on two GPUs: one prefill and one decode on each
    assert where(plan({"prefill": 2, "decode": 2}, 2, gpu_memory_utilization=0.8)) == {
        "prefill-0": ((0,), 0.4), "prefill-1": ((1,), 0.4), "decode-0": ((0,), 0.4), "decode-1": ((1,), 0.4)}
    # colocated workers go last, to the least loaded GPU
    assert where(plan({"prefill": 1, "decode": 1, "both": 1}, 3)) == {
        "prefill-0": ((0,), 0.9), "decode-0": ((1,), 0.9), "both-0": ((2,), 0.9)}
    assert where(plan({"both": 3}, 2)) == {"both-0": ((0,), 0.45), "both-1": ((1,), 0.9), "both-2": ((0,), 0.45)}


def test_explicit_devices_and_defaults_around_them():
    # prefill pinned to GPU 1: the decode worker takes the free GPU 0
    assert where(plan({"prefill": 1, "decode": 1}, 2, {"prefill": (1,)})) == {
        "prefill-0": ((1,), 0.9), "decode-0": ((0,), 0.9)}
    # both on GPU 1 (the placement that showed the cuda:1 fault)
    assert where(plan({"prefill": 1, "decode": 1}, 2, {"prefill": (1,), "decode": (1,)})) == {
        "prefill-0": ((1,), 0.45), "decode-0": ((1,), 0.45)}
    # one device per worker, in order; a single device shared by every worker of the role
    assert where(plan({"prefill": 1, "decode": 2}, 3, {"decode": (2, 0)})) == {
        "prefill-0": ((1,), 0.9), "decode-0": ((2,), 0.9), "decode-1": ((0,), 0.9)}
    assert where(plan({"decode": 2, "prefill": 1}, 2, {"decode": (1,)})) == {
        "prefill-0": ((0,), 0.9), "decode-0": ((1,), 0.45), "decode-1": ((1,), 0.45)}
    # groups of several GPUs per worker (tensor parallelism), default and explicit
    assert where(plan({"prefill": 1, "decode": 1}, 4, gpus_per_worker=2)) == {
        "prefill-0": ((0, 1), 0.9), "decode-0": ((2, 3), 0.9)}
    assert where(plan({"decode": 2}, 4, {"decode": (3, 2, 1, 0)}, gpus_per_worker=2))["decode-1"] == ((1, 0), 0.9)


def test_cpu_host_and_bad_device_lists_are_clear_errors():
    assert where(plan({"prefill": 2, "decode": 1}, 0)) == {"prefill-0": ((), None), "prefill-1": ((), None),
                                                           "decode-0": ((), None)}
    assert plan({"decode": 1}, 0)[0].flags() == []
    cases = [
        (dict(counts={"prefill": 1, "decode": 1}, num_gpus=0, devices={"decode": (0,)}), "--decode-devices: no GPU is visible"),
        (dict(counts={"prefill": 1, "decode": 1}, num_gpus=2, devices={"prefill": (2,)}), "--prefill-devices: GPU 2 does not exist"),
        (dict(counts={"prefill": 1, "decode": 2}, num_gpus=4, devices={"decode": (0, 1, 2)}), "lists 3 GPUs for 2 decode"),
        (dict(counts={"prefill": 1, "decode": 1}, num_gpus=2, devices={"both": (0,)}), "--colocated-devices given but no both"),
        (dict(counts={"decode": 1}, num_gpus=2, devices={"decode": (1, 1)}, gpus_per_worker=2), "cannot use GPU (1, 1) twice"),
        (dict(counts={"decode": 1}, num_gpus=2, gpu_memory_utilization=1.5), "--gpu-memory-utilization 1.5"),
        (dict(counts={"decode": 1}, num_gpus=1, gpus_per_worker=2), "needs 2 GPUs; 1 visible"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(PlacementError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            plan(**kwargs)
    assert parse_devices("--decode-devices", "0, 1,3") == (0, 1, 3)
    for bad in ("", "a", "0,-1", "1.5"):
        with pytest.raises(PlacementError, match="--decode-devices"):
            parse_devices("--decode-devices", bad)


def test_worker_flags_and_fit():
    p = plan({"prefill": 1, "decode": 1}, 1)
    assert p[1].flags() == ["--device", "cuda:0", "--gpu-memory-utilization", "0.4500"]
    # a TP group: one GPU per rank, rank 0 on the first
    assert plan({"decode": 1}, 2, gpus_per_worker=2)[0].flags() == [
        "--device", "cuda:0,1", "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.9000"]
    assert plan({"decode": 1}, 0, gpus_per_worker={"decode": 2})[0].flags() == ["--tensor-parallel-size", "2"]  # CPU ranks
    with pytest.raises(PlacementError, match="2 GPUs for 1 tensor-parallel"):
        WorkerPlacement("decode", 0, (0, 1), 0.9, 1).flags()
    # llama-3.1-8b in bf16 (16 GiB of weights), 8k context at 128 KiB of KV per token: 16 + 2 + 1 GiB
    assert memory_needed(16 * GiB, 131072, 8192) == 19 * GiB
    # at TP 2 each GPU holds half the weights and (with per-rank KV bytes) half the KV
    assert memory_needed(16 * GiB, 65536, 8192, tensor_parallel_size=2) == 10 * GiB + GiB // 2


def test_tensor_parallel_groups_per_role():
    # qwen3-32b: prefill TP 2 and decode TP 2 sharing two GPUs; prefill TP 1 on GPU 0 and decode TP 2 on both
    assert where(plan({"prefill": 1, "decode": 1}, 2, gpus_per_worker={"prefill": 2, "decode": 2})) == {
        "prefill-0": ((0, 1), 0.45), "decode-0": ((0, 1), 0.45)}
    assert where(plan({"prefill": 1, "decode": 1}, 2, {"prefill": (0,), "decode": (0, 1)},
                      gpus_per_worker={"decode": 2})) == {"prefill-0": ((0,), 0.45), "decode-0": ((0, 1), 0.45)}
    # by default a TP group takes the least loaded GPUs
    assert where(plan({"prefill": 1, "decode": 1}, 3, gpus_per_worker={"decode": 2})) == {
        "prefill-0": ((0,), 0.9), "decode-0": ((1, 2), 0.9)}
    with pytest.raises(PlacementError, match="lists 1 GPUs for 1 decode worker"):
        plan({"decode": 1}, 2, {"decode": (1,)}, gpus_per_worker={"decode": 2})
    with pytest.raises(PlacementError, match="needs 4 GPUs; 2 visible"):
        plan({"prefill": 1, "decode": 1}, 2, gpus_per_worker={"decode": 4})
    # fit by TP size: a TP-2 worker needs less of each GPU
    pl = plan({"prefill": 1, "decode": 1}, 2, {"prefill": (0,), "decode": (0, 1)}, gpus_per_worker={"decode": 2})
    check_fit(pl, [80 * GiB] * 2, {1: 30 * GiB, 2: 20 * GiB}, "m")
    with pytest.raises(PlacementError, match="prefill-0 gets 0.45 of GPU 0"):
        check_fit(pl, [80 * GiB] * 2, {1: 40 * GiB, 2: 20 * GiB}, "m")


def test_fit_refuses_a_share_too_small_and_names_the_way_out():
    need = memory_needed(16 * GiB, 131072, 8192)  # 19 GiB
    check_fit(plan({"prefill": 1, "decode": 1}, 1), [80 * GiB], need, "llama-3.1-8b")  # 0.45 x 80 = 36 GiB: fits
    with pytest.raises(PlacementError) as e:
        check_fit(plan({"prefill": 2, "decode": 2}, 1), [80 * GiB], need, "llama-3.1-8b")  # 0.225 x 80 = 18 GiB
    msg = str(e.value)
    assert "prefill-0 gets 0.23 of GPU 0 (18.0 GiB, shared by 4 worker(s))" in msg and "needs 19.0 GiB" in msg
    assert "--decode-devices" in msg and "--gpu-memory-utilization" in msg
    # spread over two GPUs the same four workers fit
    check_fit(plan({"prefill": 2, "decode": 2}, 2), [80 * GiB, 80 * GiB], need, "llama-3.1-8b")
    # a CPU plan has nothing to check
    check_fit(plan({"prefill": 2, "decode": 2}, 0), [], need, "llama-3.1-8b")
