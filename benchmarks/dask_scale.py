"""Scale evidence for gpuconv on Dask: a 3-D volume far larger than one worker's memory
limit, convolved on a ``distributed.LocalCluster`` whose workers have that limit.

    python benchmarks/dask_scale.py --size 768 --chunk 128 --memory-limit 1GiB

The volume (1, 1, S, S, S) float32 is generated lazily chunk by chunk (never held
anywhere), convolved to ``--out-channels`` channels with a 3x3x3 kernel and
``padding='same'``, and reduced to one number per output chunk (so the result, 8x the
input, is never held either).  Reports wall time, throughput (GFLOP/s, input voxels/s),
the peak resident memory of each worker (sampled every 0.2 s through ``client.run``)
and, for comparison, the single-array NumPy backend in this process on a volume that
fits (``--fits``), same kernel and channels.  One output chunk is checked against the
single-array result.  Shows Dask's own progress bar (``distributed.progress``) when
stdout is a terminal or with ``--progress``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def _rss():
    import psutil
    return psutil.Process().memory_info().rss


def _worker_state(dask_worker):
    """pid, bytes of task results held in memory (Dask's managed memory), bytes
    spilled to disk so far (cumulative), and the worker's status."""
    import os
    data = dask_worker.data
    fast = getattr(data, "fast", None)
    metrics = getattr(data, "cumulative_metrics", {})
    return {"pid": os.getpid(), "managed_bytes": int(getattr(fast, "total_weight", 0) or 0),
            "spilled_disk_bytes": int(metrics.get(("disk-write", "bytes"), 0)),
            "status": str(dask_worker.status)}


def _chunk_sum(b):
    return np.array([[[[[b.sum(dtype=np.float64)]]]]])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=768, help="volume edge S (default 768)")
    p.add_argument("--chunk", type=int, default=128, help="chunk edge (default 128)")
    p.add_argument("--out-channels", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="1GiB", help="per worker (default 1GiB)")
    p.add_argument("--fits", type=int, default=256, help="edge of the single-array run")
    p.add_argument("--progress", action="store_true", help="progress bar even without a tty")
    p.add_argument("--workspace-mb", type=float, default=None,
                   help="GPUCONV_WORKSPACE_MB for this process and the workers (default: 256)")
    p.add_argument("--json", help="write the numbers here")
    a = p.parse_args(argv)
    if a.workspace_mb is not None:  # the workers inherit the environment
        os.environ["GPUCONV_WORKSPACE_MB"] = str(a.workspace_mb)

    import dask.array as da
    from distributed import Client, LocalCluster, get_task_stream, progress
    import gpuconv
    import gpuconv._cpu.parallel

    S, c, K = a.size, a.chunk, a.out_channels
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, 1, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    flops_per_voxel = 2 * K * 27
    out = {"size": S, "chunk": c, "out_channels": K, "workers": a.workers,
           "memory_limit": a.memory_limit, "load_before": os.getloadavg()}

    # -- single-array NumPy backend on a volume that fits (this process, all its threads),
    # measured before and after the cluster run (the machine is shared: a bracket)
    xf = np.random.default_rng(1).standard_normal((1, 1, a.fits, a.fits, a.fits),
                                                   dtype=np.float32)
    gpuconv.conv(xf[..., :32, :32, :32], w, b, padding="same")  # warm-up

    def single_array():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            gpuconv.conv(xf, w, b, padding="same")
            times.append(time.perf_counter() - t0)
        tf = float(np.median(times))
        return {"edge": a.fits, "seconds": tf,
                "threads": gpuconv._cpu.parallel.get_num_threads(),
                "gflops": flops_per_voxel * a.fits ** 3 / tf / 1e9,
                "mvoxel_per_s": a.fits ** 3 / tf / 1e6}

    out["single_array_before"] = single_array()

    with LocalCluster(n_workers=a.workers, threads_per_worker=1, processes=True,
                      memory_limit=a.memory_limit, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        x = da.random.default_rng(2).standard_normal((1, 1, S, S, S), chunks=(1, 1, c, c, c),
                                                     dtype=np.float32)
        y = gpuconv.conv(x, w, b, padding="same")
        sums = y.map_blocks(_chunk_sum, chunks=((1,),) * 2 + ((1,) * len(y.chunks[2]),) * 3,
                            dtype=np.float64)
        out["chunks"] = {"x": [len(v) for v in x.chunks], "y": [list(set(v)) for v in y.chunks]}
        peak = {}
        stop = threading.Event()

        states, managed = set(), {}

        def sample():
            while not stop.is_set():
                try:
                    for addr, v in client.run(_rss).items():
                        peak[addr] = max(peak.get(addr, 0), v)
                    for addr, v in client.run(_worker_state).items():
                        states.add(v["status"])
                        managed[addr] = max(managed.get(addr, 0), v["managed_bytes"])
                except Exception:
                    pass
                stop.wait(0.2)

        base = client.run(_rss)
        before = client.run(_worker_state)
        out["worker_workspace_MiB"] = sorted(
            v / 2 ** 20 for v in client.run(gpuconv.get_workspace_limit).values())
        out["worker_gpuconv_threads"] = sorted(
            client.run(gpuconv._cpu.parallel.get_num_threads).values())
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        with get_task_stream(client) as ts:
            fut = client.compute(sums)
            if a.progress or sys.stdout.isatty():
                progress(fut)
                print()
            res = fut.result()
        td = time.perf_counter() - t0
        busy = {}
        for rec in ts.data:  # seconds per task kind (compute) or action (transfer, ...), summed over the workers
            key = rec["key"][0] if isinstance(rec["key"], tuple) else rec["key"]
            prefix = str(key).rsplit("-", 1)[0]
            for ss in rec.get("startstops", ()):
                name = prefix if ss["action"] == "compute" else ss["action"]
                busy[name] = busy.get(name, 0.0) + ss["stop"] - ss["start"]
        out["task_seconds"] = {k: round(v, 2) for k, v in
                                       sorted(busy.items(), key=lambda kv: -kv[1])}
        stop.set()
        th.join()
        after = client.run(_worker_state)
        out["workers_restarted"] = sorted(v["pid"] for v in before.values()) != sorted(
            v["pid"] for v in after.values())
        out["spilled_disk_MiB"] = sorted(v["spilled_disk_bytes"] / 2 ** 20 for v in after.values())
        out["worker_managed_peak_MiB"] = sorted(v / 2 ** 20 for v in managed.values())
        out["worker_statuses_seen"] = sorted(states)
        # check one output chunk (interior where there is one) against the single array
        i = min(1, len(y.chunks[2]) - 1)
        lo, hi = max(i * c - 1, 0), min((i + 1) * c + 1, S)
        pad = (i * c - lo == 0, hi - (i + 1) * c == 0)  # zero padding at the volume's faces
        xs = x[:, :, lo:hi, lo:hi, lo:hi].compute()
        want = gpuconv.conv(xs, w, b, padding=((int(pad[0]), int(pad[1])),) * 3)
        got = y.blocks[0, 0, i, i, i].compute()
        err = float(np.abs(got - want).max() / np.abs(want).max())
        out["dask"] = {"seconds": td, "gflops": flops_per_voxel * S ** 3 / td / 1e9,
                       "mvoxel_per_s": S ** 3 / td / 1e6, "checksum": float(res.sum()),
                       "chunk_check_rel_err": err,
                       "worker_rss_start_MiB": sorted(v / 2 ** 20 for v in base.values()),
                       "worker_rss_peak_MiB": sorted(v / 2 ** 20 for v in peak.values()),
                       "input_GiB": S ** 3 * 4 / 2 ** 30, "output_GiB": K * S ** 3 * 4 / 2 ** 30,
                       "chunk_input_MiB": c ** 3 * 4 / 2 ** 20,
                       "chunk_output_MiB": K * c ** 3 * 4 / 2 ** 20}
    out["single_array_after"] = single_array()
    out["ratio_dask_vs_single"] = [out["dask"]["gflops"] / out[k]["gflops"]
                                   for k in ("single_array_before", "single_array_after")]
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
