"""Prometheus-native ingest, measured with a real Prometheus server (`make prometheus`).

One run, three parts, every process on this machine:

1. Throughput. A real Prometheus scrapes an exporter of SERIES series every SCRAPE
   seconds and remote-writes them to tsad (Prometheus' default queue settings) while a
   synthetic sender remote-writes other streams at full speed (requests of 100 series x
   BATCH points, back to back, CLIENTS at a time). Both feed the same tsad (Redis store,
   default detector and settings). Reported: samples/s acknowledged and points/s scored,
   for each source. The Prometheus series are warmed up first (history sent by remote-
   write), so that every scraped sample is scored, and their scores written back before
   the run starts (the synthetic streams warm up during the run: points scored counts
   fewer than points stored).
2. End-to-end delay: from a sample's scrape time stamp to its tsad_anomaly_score sample
   being queryable in that Prometheus (tsad writes back with TSAD_WRITEBACK_URL), p50 and
   p99 over every scraped sample of the throughput run, polled every 0.25 s.
3. Write-back queue bound: tsad scoring at full speed while its write-back target is down
   for DOWN_SECONDS (300): the queue's points (tsad_writeback_queue_points), the points
   dropped for it, and the process's resident memory, sampled; plus the Python heap of a
   full queue (TSAD_WRITEBACK_MAX_POINTS points) measured in process with tracemalloc.

The kill -9 figures come from tests/test_prometheus_e2e.py (asserted there).

    .venv/bin/python benchmarks/prometheus_ingest.py            # about 12 minutes
    .venv/bin/python benchmarks/prometheus_ingest.py --quick    # a 1-minute smoke run

Writes benchmarks/results/prometheus_ingest.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import throughput  # noqa: E402
from service.ingest.local import Exporter, PrometheusServer  # noqa: E402
from service.ingest.wire import REMOTE_WRITE_HEADERS, encode_remote_write  # noqa: E402
from service.process import ServiceProcess, free_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DROPPED = "tsad_writeback_points_dropped_total"


def start_redis() -> tuple[subprocess.Popen, str]:
    port = free_port()
    return throughput.start_redis(port, tempfile.mkdtemp(prefix="tsad-bench-redis-")), \
        f"redis://127.0.0.1:{port}/0"


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: what it cost, whatever else the machine ran."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Sender:
    """Remote-write at full speed: ``clients`` concurrent loops, each request 100 streams
    x ``batch`` points, time stamps moving forward."""

    def __init__(self, url: str, prefix: str, streams: int, batch: int, clients: int,
                 spacing: float = 1.0) -> None:
        self.url, self.prefix, self.spacing = url + "/api/v1/write", prefix, spacing
        self.streams, self.batch, self.clients = streams, batch, clients
        self.samples = 0
        self.errors: dict[str, int] = {}  # status -> requests

    def body(self, streams: range, t0: float, labels: dict | None = None) -> bytes:
        rng = np.random.default_rng(int(t0) % 2**31)
        series = []
        for s in streams:
            lab = labels(s) if labels else {"__name__": self.prefix, "series": str(s)}
            values = 10 + rng.normal(0, 1, self.batch)
            series.append((sorted(lab.items()), [
                (int((t0 + i * self.spacing) * 1000), float(v))
                for i, v in enumerate(values)]))
        return encode_remote_write(series)

    async def run(self, seconds: float, start: float, labels=None) -> float:  # noqa: ANN001
        """Send for ``seconds``; each client its own streams; returns the elapsed s."""
        per = self.streams // self.clients
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=60, headers=REMOTE_WRITE_HEADERS) as client:
            async def loop(k: int) -> None:
                t = start
                while time.monotonic() < deadline:
                    for lo in range(k * per, (k + 1) * per, 100):
                        body = self.body(range(lo, min(lo + 100, (k + 1) * per)), t, labels)
                        try:
                            status = str((await client.post(self.url, content=body))
                                         .status_code)
                        except httpx.TimeoutException:  # counted, as a sender would retry
                            status = "timeout"
                        if status == "204":
                            self.samples += min(100, (k + 1) * per - lo) * self.batch
                        else:
                            self.errors[status] = self.errors.get(status, 0) + 1
                    t += self.batch * self.spacing
            t0 = time.monotonic()
            await asyncio.gather(*(loop(k) for k in range(self.clients)))
            return time.monotonic() - t0


def throughput_and_delay(redis_url: str, args: argparse.Namespace) -> dict:
    prom_port = free_port()
    log = Path(tempfile.mkdtemp(prefix="tsad-bench-")) / "tsad.log"
    tsad = ServiceProcess({"REDIS_URL": redis_url, "TSAD_LOG_LEVEL": "WARNING",
                           "TSAD_WRITEBACK_URL": f"http://127.0.0.1:{prom_port}/api/v1/write",
                           "TSAD_MAX_STREAMS": "100000"}, log_path=log).start()
    rng = np.random.default_rng(0)
    exporter = Exporter(lambda: "".join(
        f'bench_level{{series="{i}"}} {10 + rng.normal():.4f}\n' for i in range(args.series)))
    exporter.start()
    labels = lambda i: {"__name__": "bench_level", "series": str(i),  # noqa: E731
                        "instance": exporter.target, "job": "bench"}
    # warm the Prometheus series up: 400 points of history each, by remote-write
    warm = Sender(tsad.url, "bench_level", args.series, 400, 2)
    start = time.time()
    history = start - 400 * args.scrape - 60
    t0 = time.monotonic()
    for lo in range(0, args.series, 100):
        body = warm.body(range(lo, min(lo + 100, args.series)), history, labels)
        r = httpx.post(tsad.url + "/api/v1/write", content=body,
                       headers=REMOTE_WRITE_HEADERS, timeout=300)
        assert r.status_code == 204, r.text
    warmup_s = time.monotonic() - t0
    print(json.dumps({"warmup": {"points": args.series * 400, "seconds": round(warmup_s, 1)}}),
          flush=True)
    prom = PrometheusServer({
        "global": {"scrape_interval": f"{round(args.scrape * 1000)}ms"},
        "scrape_configs": [{"job_name": "bench",
                            "static_configs": [{"targets": [exporter.target]}]}],
        "remote_write": [{"url": f"{tsad.url}/api/v1/write", "write_relabel_configs": [
            {"source_labels": ["__name__"], "regex": "bench_level", "action": "keep"}]}]},
        port=prom_port).start()
    # the warm-up's scores, queued while Prometheus was not up yet, are written back
    # first: measure from an empty queue, or the first delays are that backlog's
    t0 = time.monotonic()
    while metric(httpx.get(tsad.url + "/metrics").text, "tsad_writeback_queue_points") and \
            time.monotonic() - t0 < 300:
        time.sleep(0.5)
    drain_s = time.monotonic() - t0
    before = httpx.get(tsad.url + "/metrics").text
    cpu_before = cpu_seconds(tsad.proc.pid)
    # stamps 20 ms apart from half an hour ago: recent enough for Prometheus to take
    # their scores (it refuses samples older than its head block, about an hour)
    sender = Sender(tsad.url, "synth", args.synth_streams, args.batch, args.clients, 0.02)
    seen: dict[tuple[str, float], float] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                for r in prom.query('timestamp(tsad_anomaly_score{for="bench_level"})'):
                    key = (r["metric"]["stream"], float(r["value"][1]))
                    seen.setdefault(key, time.time())
            except (httpx.HTTPError, AssertionError):
                pass
            stop.wait(0.25)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    run_start = time.time()
    elapsed = asyncio.run(sender.run(args.seconds, run_start - 1800))
    time.sleep(args.scrape * 2)  # the last scrapes scored and written back
    stop.set()
    poller.join()
    after = httpx.get(tsad.url + "/metrics").text
    cpu = cpu_seconds(tsad.proc.pid) - cpu_before
    scraped = [t for (_, t) in seen if t >= run_start]

    def grew(name: str) -> float:  # over the run
        return metric(after, name) - metric(before, name)

    delays = np.array([w - t for (_, t), w in seen.items() if t >= run_start])
    prom_samples = len(scraped)
    out = {
        "series": args.series, "scrape_interval_s": args.scrape,
        "warmup_writeback_drain_s": round(drain_s, 1),
        "synthetic": {"streams": args.synth_streams, "points_per_request_per_stream":
                      args.batch, "clients": args.clients, "seconds": round(elapsed, 1),
                      "samples": sender.samples, "errors": sender.errors,
                      "samples_per_s": round(sender.samples / elapsed)},
        "prometheus": {"scored_samples_written_back": prom_samples,
                       "samples_per_s": round(prom_samples / (args.seconds + args.scrape), 1)},
        "tsad_cpu_s": round(cpu, 1),
        "tsad_cpu_us_per_sample": round(cpu / max(1, sender.samples + prom_samples) * 1e6, 1),
        "points_scored_per_s": round((metric(after, "tsad_points_scored_total") -
                                      metric(before, "tsad_points_scored_total")) /
                                     (elapsed + args.scrape * 2)),
        "delay_s": {"p50": round(float(np.percentile(delays, 50)), 2) if len(delays) else None,
                    "p99": round(float(np.percentile(delays, 99)), 2) if len(delays) else None,
                    "max": round(float(delays.max()), 2) if len(delays) else None,
                    "samples": int(len(delays))},
        "writeback": {"sent": grew("tsad_writeback_points_sent_total"),
                      "dropped": {r: grew(f'{DROPPED}{{reason="{r}"}}')
                                  for r in ("queue_full", "rejected", "out_of_order")},
                      "requests": {o: grew(f'tsad_writeback_requests_total{{outcome="{o}"}}')
                                   for o in ("ok", "retry", "rejected")},
                      # why the target refused points, if it did (tsad's log)
                      "refusals": [json.loads(line).get("error") for line in
                                   log.read_text().splitlines()
                                   if "write-back point refused" in line][:3]},
    }
    prom.cleanup()
    exporter.stop()
    tsad.stop()
    return out


def queue_bound(redis_url: str, args: argparse.Namespace) -> dict:
    dead = free_port()  # nothing listens: the target is down
    tsad = ServiceProcess({"REDIS_URL": redis_url, "TSAD_LOG_LEVEL": "ERROR",
                           "TSAD_WRITEBACK_URL": f"http://127.0.0.1:{dead}/api/v1/write",
                           "TSAD_DEFAULT_DETECTOR": "residual_linear",
                           "TSAD_DETECTOR_PARAMS": '{"*": {"warmup": 8}}',
                           "TSAD_DEFAULT_WINDOW": "16"}).start()
    pid = tsad.proc.pid
    base = rss(pid)
    sender = Sender(tsad.url, "down", 200, 50, 2)
    samples: list[dict] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            text = httpx.get(tsad.url + "/metrics", timeout=30).text
            samples.append({"t": round(time.monotonic() - t0, 1), "rss": rss(pid),
                            "queue": metric(text, "tsad_writeback_queue_points"),
                            "dropped": metric(
                                text, 'tsad_writeback_points_dropped_total{reason="queue_full"}'),
                            "scored": metric(text, "tsad_points_scored_total")})
            stop.wait(5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    asyncio.run(sender.run(args.down, time.time() - 86400 + 60))
    stop.set()
    sampler.join()
    tsad.stop()
    peak = max(samples, key=lambda s: s["rss"])
    return {"down_seconds": args.down, "idle_rss_mb": round(base / 2**20, 1),
            "peak_rss_mb": round(peak["rss"] / 2**20, 1),
            "peak_queue_points": max(s["queue"] for s in samples),
            "dropped_queue_full": samples[-1]["dropped"],
            "points_scored": samples[-1]["scored"],
            "rss_mb_last_minute": [round(s["rss"] / 2**20, 1) for s in samples
                                   if s["t"] >= args.down - 60],
            "full_queue_heap_mb": round(full_queue_heap() / 2**20, 1)}


def full_queue_heap() -> int:
    """Python heap of a write-back queue holding TSAD_WRITEBACK_MAX_POINTS points of 1,000
    streams with Prometheus-like labels (tracemalloc, in this process)."""
    from prometheus_client import CollectorRegistry

    from service.ingest.writeback import ScoreWriter
    from service.metrics import ServiceMetrics
    from service.settings import Settings

    settings = Settings(writeback_url="http://127.0.0.1:9/api/v1/write")
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    writer = ScoreWriter(settings, ServiceMetrics(CollectorRegistry()))
    per = settings.writeback_max_points // 1000
    for s in range(1000):
        labels = {"instance": "10.0.0.1:9100", "job": "node", "series": str(s),
                  "stream": f"bench_level.instance:10.0.0.1:9100.job:node.series:{s}",
                  "for": "bench_level"}
        writer.enqueue(labels, [(1.7e9 + i, 1.5, 0.7, False) for i in range(per)])
    after = tracemalloc.take_snapshot()
    size = sum(s.size_diff for s in after.compare_to(before, "filename"))
    tracemalloc.stop()
    assert len(writer.queue) == settings.writeback_max_points
    return size


def sample_load(into: list[float], done: threading.Event) -> None:
    """The 1-minute load average every 10 s: the machine is shared."""
    while True:
        into.append(os.getloadavg()[0])
        if done.wait(10):
            return


def markdown(out: dict) -> str:
    t, q, load = out["throughput"], out["queue"], out["load_average_1min"]
    wb = t["writeback"]
    syn = t["synthetic"]
    return "\n".join([
        "# Prometheus-native ingest", "",
        f"`python benchmarks/prometheus_ingest.py{' --quick' if out['quick'] else ''}` on "
        f"{out['machine']}; Prometheus {out['prometheus']}, tsad on Redis, default detector "
        "and settings; every process on this machine (2 cores, shared with other work: 1-minute "
        f"load average {out['load_average_at_start']:.1f} at the start, "
        f"{out['load_average_at_end']:.1f} at the end, {load['mean']:.1f} on average and "
        f"{load['max']:.1f} at most over the run, sampled every 10 s).", "",
        "| what | figure |", "| --- | --- |",
        f"| real Prometheus: {t['series']:,} series every {t['scrape_interval_s']:g} s, "
        f"samples scored and written back | {t['prometheus']['samples_per_s']} samples/s |",
        f"| synthetic remote-write sender at full speed ({syn['streams']} streams, "
        f"{syn['clients']} clients, 100 series x {syn['points_per_request_per_stream']} "
        f"points a request), same run | {syn['samples_per_s']:,} samples/s "
        f"(refused: {syn['errors'] or 'none'}) |",
        f"| tsad's CPU time per sample acknowledged, both together (user + system; load-proof) "
        f"| {t['tsad_cpu_us_per_sample']} µs ({t['tsad_cpu_s']} s) |",
        f"| points scored, both together (the synthetic streams warm up first) | "
        f"{t['points_scored_per_s']:,} points/s |",
        f"| write-back in the same run: points sent, dropped | {wb['sent']:,.0f}, "
        f"{sum(wb['dropped'].values()):,.0f} ({wb['requests']['ok']:,.0f} requests, "
        f"{wb['requests']['retry']:,.0f} retried) |",
        f"| scrape to score queryable in Prometheus, p50 / p99 (max) | {t['delay_s']['p50']} s / "
        f"{t['delay_s']['p99']} s ({t['delay_s']['max']} s), {t['delay_s']['samples']:,} samples |",
        f"| write-back target down {q['down_seconds']} s: peak queue | "
        f"{q['peak_queue_points']:,.0f} points (bound {out['max_points']:,}, the batch "
        f"of {out['batch_points']:,} in flight included); "
        f"{q['dropped_queue_full']:,.0f} oldest dropped |",
        f"| same: tsad resident memory idle / peak | {q['idle_rss_mb']} MB / "
        f"{q['peak_rss_mb']} MB |",
        f"| Python heap of a full queue ({out['max_points']:,} points, tracemalloc) | "
        f"{q['full_queue_heap_mb']} MB |",
        "",
        "Delay includes Prometheus' own remote-write batching (batch_send_deadline 5 s by "
        "default) and tsad's write-back flush (TSAD_WRITEBACK_FLUSH_SECONDS, 1 s), and the "
        "0.25 s poll. Kill -9 figures: tests/test_prometheus_e2e.py.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--scrape", type=float, default=10.0, help="scrape interval, s")
    parser.add_argument("--seconds", type=float, default=120.0, help="throughput run, s")
    parser.add_argument("--synth-streams", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10, help="points per stream a request")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--down", type=float, default=300.0, help="write-back target down, s")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS / "prometheus_ingest")
    args = parser.parse_args()
    if args.quick:
        args.series, args.seconds, args.down, args.scrape = 100, 20.0, 20.0, 5.0
    redis, url = start_redis()
    try:
        from service.settings import Settings

        out = {"quick": args.quick, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "prometheus": subprocess.run(
                   [PrometheusServer({}).binary, "--version"], capture_output=True,
                   text=True).stdout.split("\n")[0],
               "max_points": Settings().writeback_max_points,
               "batch_points": Settings().writeback_batch_points,
               "load_average_at_start": os.getloadavg()[0]}
        loads: list[float] = []
        done = threading.Event()
        load_sampler = threading.Thread(target=sample_load, args=(loads, done), daemon=True)
        load_sampler.start()
        out["throughput"] = throughput_and_delay(url, args)
        print(json.dumps(out["throughput"]), flush=True)
        subprocess.run(["redis-cli", "-u", url, "FLUSHALL"], capture_output=True)
        out["queue"] = queue_bound(url, args)
        print(json.dumps(out["queue"]), flush=True)
        out["load_average_at_end"] = os.getloadavg()[0]
        done.set()
        load_sampler.join()
        out["load_average_1min"] = {"min": min(loads), "mean": round(sum(loads) / len(loads), 2),
                                    "max": max(loads), "samples": len(loads)}
    finally:
        redis.terminate()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
