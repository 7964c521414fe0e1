"""Soak test of the critic server (not run in CI): concurrent clients for minutes, then figures.

    .venv/bin/python bench/soak_critic.py [--duration 300] [--clients 8] [--warmup 60] [--rm RUN_DIR]

Starts a real ``serve_ppo_critic.py`` process (one rank, token through ALIGNER_CRITIC_TOKEN) from
a reward model: ``--rm`` (a train_reward_model.py run directory), or by default a tiny one trained
here for two steps. Then ``--clients`` threads, each with its own HTTP connection, send a mix of
requests for ``--duration`` seconds:

* infer (70%): B=8 x S=48 random tokens (an actor's rollout micro-batch);
* train (25%): B=16 x S=48, sequenced (``step`` metadata) like the actor's, retried with the
  same Idempotency-Key after a 503;
* save (5%): at the step the critic has reached (checkpoints pruned to save_top_k=2).

Train and save go through one client-side lock, as a single PPO actor would issue them; infers
overlap them freely. The clients do not use CriticClient (which retries 503 silently): every
response is recorded as it came. A probe thread times GET /health every second, and the server's
RSS is sampled every 2 s.

Pass criteria (from issue 11): every response is 2xx, or 503 with a Retry-After header; the
server's RSS grows by less than 5% between the end of the warm-up and the end. Figures go to
bench/results/soak_critic.json (gitignored unless added with -f).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import psutil  # noqa: E402
import requests  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

SCRIPTS = REPO_ROOT / "examples" / "nlp" / "gpt"
RESULT = BENCH_DIR / "results" / "soak_critic.json"
TINY = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_query_groups=null", "model.encoder_seq_length=64", "model.micro_batch_size=2",
        "model.global_batch_size=4"]
SENTENCES = ["the movie was great and I loved it", "the movie was terrible and boring", "what a wonderful film",
             "an awful waste of time", "great acting and a fine story", "bad plot and poor acting"]
INFER_SHAPE, TRAIN_SHAPE = (8, 48), (16, 48)
MIX = (("infer", 0.70), ("train", 0.25), ("save", 0.05))


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "SLURM_", "PMI_"))}
    env.update(OMP_NUM_THREADS="1", ALIGNER_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def train_tiny_reward_model(root: Path) -> tuple[Path, int]:
    """A two-step reward model on a few sentences (its head is no longer zero); (run dir, vocab)."""
    from aligner.data.train_tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(SENTENCES * 3, 300, root / "tok")
    data = root / "comparisons.jsonl"
    pairs = [("Review: ", "the movie was great", "the movie was bad"), ("Review: ", "a wonderful film", "an awful film")]
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs * 4))
    run_dir = root / "rm"
    args = [*TINY, "trainer.rm.max_steps=2", "trainer.rm.val_check_interval=0", "model.optim.lr=0.01",
            "model.optim.sched.warmup_steps=0", "pretrained_checkpoint.restore_from_path=null",
            f"model.tokenizer.model={root / 'tok'}", f"model.data.train_ds.file_path={data}",
            f"model.data.validation_ds.file_path={data}", f"exp_manager.explicit_log_dir={run_dir}",
            "exp_manager.create_tensorboard_logger=false", "exp_manager.create_csv_logger=false"]
    print("training a tiny reward model (2 steps) ...", flush=True)
    subprocess.run([sys.executable, str(SCRIPTS / "train_reward_model.py"), *args], check=True, cwd=str(root),
                   env=child_env(), stdout=subprocess.DEVNULL)
    return run_dir, tokenizer.vocab_size


def vocab_of(run_dir: Path) -> int:
    from aligner.training import checkpoint

    latest = checkpoint.latest_complete(run_dir / "checkpoints")
    if latest is None:
        raise SystemExit(f"--rm {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
    return int(checkpoint.read_trainer_state(latest)["model_config"]["vocab_size"])


class Server:
    def __init__(self, rm_dir: Path, root: Path, token: str, threads: int, queue_limit: int):
        self.log_dir = root / "critic"
        self.ready = root / "critic.ready"
        self.log_path = root / "critic.log"
        cmd = [sys.executable, str(SCRIPTS / "serve_ppo_critic.py"), f"pretrained_checkpoint.restore_from_path={rm_dir}",
               "trainer.ppo.port=0", f"trainer.ppo.ready_file={self.ready}", f"trainer.ppo.threads={threads}",
               f"trainer.ppo.queue_limit={queue_limit}", f"exp_manager.explicit_log_dir={self.log_dir}",
               "exp_manager.resume_if_exists=false", "exp_manager.create_tensorboard_logger=false",
               "exp_manager.checkpoint_callback_params.save_top_k=2", "model.optim.sched.warmup_steps=0",
               "trainer.ppo.inference_micro_batch_size=8", "model.micro_batch_size=8", "trainer.ppo.max_steps=100000"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(root),
                                     env=child_env(ALIGNER_CRITIC_TOKEN=token))
        self.url = ""

    def wait_ready(self, timeout_s: float = 600) -> str:
        from aligner.serving.server import read_ready_file

        deadline = time.monotonic() + timeout_s
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"critic server did not start:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        host, port = read_ready_file(str(self.ready))
        self.url = f"http://{host}:{port}"
        return self.url

    def rss_bytes(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Soak:
    """The clients' shared state: records, the actor-like train/save sequence, the stop flag."""

    def __init__(self, url: str, token: str, vocab: int, seed: int):
        self.url, self.vocab = url, vocab
        self.headers = {"Authorization": f"Bearer {token}"}
        self.stop = threading.Event()
        self.lock = threading.Lock()  # records
        self.state_lock = threading.Lock()  # train/save, one at a time and in order, like one actor
        self.next_step = 1
        self.statuses: dict[str, Counter] = defaultdict(Counter)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.violations: list[dict] = []
        self.run_id = uuid.uuid4().hex[:8]
        self.seed = seed

    def record(self, op: str, response: requests.Response | None, seconds: float, error: str | None = None) -> None:
        with self.lock:
            if response is None:
                self.statuses[op]["connection error"] += 1
                self.violations.append({"op": op, "error": error})
                return
            status = response.status_code
            self.statuses[op][str(status)] += 1
            self.latencies[op].append(seconds)
            ok = 200 <= status < 300 or (status == 503 and "Retry-After" in response.headers)
            if not ok:
                self.violations.append({"op": op, "status": status, "body": response.text[:300],
                                        "retry_after": response.headers.get("Retry-After")})

    def post(self, session: requests.Session, op: str, body: bytes, headers: dict | None = None):
        started = time.perf_counter()
        try:
            response = session.post(f"{self.url}/v1/{op}", data=body, headers={**self.headers, **(headers or {})},
                                    timeout=120)
        except requests.RequestException as exc:
            self.record(op, None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
            return None
        self.record(op, response, time.perf_counter() - started)
        return response

    def client(self, index: int) -> None:
        rng = random.Random(self.seed + index)
        gen = torch.Generator().manual_seed(self.seed + index)
        session = requests.Session()
        ops, weights = zip(*MIX)
        while not self.stop.is_set():
            op = rng.choices(ops, weights)[0]
            if op == "infer":
                tokens = torch.randint(0, self.vocab, INFER_SHAPE, generator=gen)
                lengths = torch.randint(1, INFER_SHAPE[1] + 1, (INFER_SHAPE[0],), generator=gen)
                response = self.post(session, "infer", safetensors.torch.save({"tokens": tokens, "lengths": lengths}))
                if response is not None and response.status_code == 503:
                    self.stop.wait(float(response.headers.get("Retry-After", 1)))
            elif op == "train":
                self.train(session, gen)
            else:
                self.save(session)

    def _until_not_busy(self, session, op: str, body: bytes, key: str) -> requests.Response | None:
        while True:  # the same key on every retry: applied at most once
            response = self.post(session, op, body, {"Idempotency-Key": key})
            if response is None or response.status_code != 503 or self.stop.is_set():
                return response
            self.stop.wait(float(response.headers.get("Retry-After", 1)))

    def train(self, session, gen) -> None:
        batch, seq = TRAIN_SHAPE
        tensors = {"tokens": torch.randint(0, self.vocab, TRAIN_SHAPE, generator=gen),
                   "lengths": torch.randint(1, seq + 1, (batch,), generator=gen),
                   "returns": torch.randn(TRAIN_SHAPE, generator=gen), "prev_values": torch.zeros(TRAIN_SHAPE),
                   "mask": (torch.rand(TRAIN_SHAPE, generator=gen) > 0.2).float()}
        with self.state_lock:
            step = self.next_step
            body = safetensors.torch.save(tensors, metadata={"step": str(step)})
            response = self._until_not_busy(session, "train", body, f"{self.run_id}:train:{step}")
            if response is not None and response.status_code == 200:
                self.next_step += 1

    def save(self, session) -> None:
        with self.state_lock:
            step = self.next_step - 1
            body = safetensors.torch.save({}, metadata={"step": str(step)})
            self._until_not_busy(session, "save", body, f"{self.run_id}:save:{step}:{uuid.uuid4().hex[:6]}")

    def probe_health(self, into: list[float]) -> None:
        session = requests.Session()
        while not self.stop.wait(1.0):
            started = time.perf_counter()
            try:
                response = session.get(f"{self.url}/health", timeout=30)
                ok = response.status_code == 200
            except requests.RequestException:
                ok = False
            with self.lock:
                into.append(time.perf_counter() - started if ok else float("inf"))


def summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"count": len(values), "p50_s": round(statistics.median(ordered), 4), "p95_s": round(pick(0.95), 4),
            "max_s": round(ordered[-1], 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline (default 60)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rm", type=Path, default=None, help="reward-model run dir (default: train a tiny one)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the server writes (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=8, help="server HTTP threads (trainer.ppo.threads)")
    parser.add_argument("--queue-limit", type=int, default=4, help="trainer.ppo.queue_limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.duration:
        parser.error("need 0 <= --warmup < --duration")

    with tempfile.TemporaryDirectory(prefix="soak_critic_") as tmp:
        root = (args.workdir or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        rm_dir, vocab = (args.rm.resolve(), vocab_of(args.rm.resolve())) if args.rm else train_tiny_reward_model(root)
        token = uuid.uuid4().hex
        server = Server(rm_dir, root, token, args.threads, args.queue_limit)
        try:
            url = server.wait_ready()
            print(f"critic server at {url}; {args.clients} clients for {args.duration:.0f} s", flush=True)
            soak = Soak(url, token, vocab, args.seed)
            health: list[float] = []
            threads = [threading.Thread(target=soak.client, args=(i,), daemon=True) for i in range(args.clients)]
            threads.append(threading.Thread(target=soak.probe_health, args=(health,), daemon=True))
            rss: list[tuple[float, int]] = [(0.0, server.rss_bytes())]
            started = time.monotonic()
            for thread in threads:
                thread.start()
            while (elapsed := time.monotonic() - started) < args.duration:
                time.sleep(min(2.0, args.duration - elapsed))
                rss.append((round(time.monotonic() - started, 1), server.rss_bytes()))
                if int(elapsed) % 30 < 2:
                    total = sum(sum(c.values()) for c in soak.statuses.values())
                    print(f"  {elapsed:5.0f} s: {total} responses, RSS {rss[-1][1] / 2**20:.1f} MiB, "
                          f"{len(soak.violations)} violations", flush=True)
            soak.stop.set()
            for thread in threads:
                thread.join(timeout=180)
            wall = time.monotonic() - started
            metrics = requests.get(f"{url}/v1/metrics", headers=soak.headers, timeout=30).json()
        finally:
            exit_code = server.stop()

    baseline = min((r for r in rss if r[0] >= args.warmup), key=lambda r: r[0], default=rss[-1])
    final = rss[-1]
    after = [value for t, value in rss if t >= args.warmup]
    growth = (final[1] - baseline[1]) / baseline[1]
    total = {op: sum(c.values()) for op, c in soak.statuses.items()}
    passed = not soak.violations and growth < 0.05 and exit_code == 0
    result = {
        "benchmark": "soak_critic",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {"duration_s": args.duration, "warmup_s": args.warmup, "clients": args.clients,
                   "mix": dict(MIX), "infer_shape": INFER_SHAPE, "train_shape": TRAIN_SHAPE,
                   "server_threads": args.threads, "queue_limit": args.queue_limit,
                   "reward_model": str(rm_dir) if args.rm else "tiny, trained here (2 steps)"},
        "machine": {"cpu_count": os.cpu_count(), "load_average_1m_at_end": os.getloadavg()[0]},
        "wall_s": round(wall, 1),
        "responses": {op: dict(c) for op, c in soak.statuses.items()},
        "responses_per_s": {op: round(n / wall, 2) for op, n in total.items()},
        "train_steps_applied": soak.next_step - 1,
        "latency": {op: summary(v) for op, v in soak.latencies.items()},
        "health_probe": summary([h for h in health if h != float("inf")]) | {"failed": health.count(float("inf"))},
        "violations": len(soak.violations),
        "violation_examples": soak.violations[:10],
        "rss_mib": {"start": round(rss[0][1] / 2**20, 1), "at_warmup_end": round(baseline[1] / 2**20, 1),
                    "end": round(final[1] / 2**20, 1), "max_after_warmup": round(max(after) / 2**20, 1),
                    "growth_after_warmup_pct": round(100 * growth, 2)},
        "rss_samples": [(t, round(v / 2**20, 1)) for t, v in rss],
        "server_exit_code": exit_code,
        "server_metrics": {k: metrics.get(k) for k in ("requests", "queue", "idempotency", "limits")},
        "criteria": {"every response 2xx or 503 with Retry-After": not soak.violations,
                     "RSS growth after warm-up < 5%": growth < 0.05, "clean SIGTERM exit": exit_code == 0},
        "passed": passed,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("responses", "violations", "rss_mib", "health_probe", "passed")},
                     indent=2))
    print(f"written: {args.output}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
