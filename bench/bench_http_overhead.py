"""HTTP + serialisation overhead of the critic server, as a share of the critic's own compute.

Why: the PPO actor talks to the critic over HTTP (aligner.serving) with safetensors bodies.
That plumbing must stay a small tax on the model work it carries (target <= 5%).

Setup (one process, no subprocess): the real Flask app (`create_app`) under waitress
(`BackgroundServer`), called by the real `CriticClient` over loopback TCP. The handler runs
the fixed bench Llama trunk (bench/common.py, weights imported) with a scalar value head,
built by `build_gpt(..., scalar_head=True)` on megatron-core:

* infer: forward only, values [B, S] zeroed beyond each row's length;
* train: forward + clipped value loss (aligner.objectives.ppo) + backward + Adam step.

Workloads: a PPO-sized infer (32 rows x 64 tokens: prompt 32 + response 32), a train call on
the whole rollout (32 x 64) and one on a mini-batch (8 x 64, 4 mini-batches per update).

Per repetition, interleaved with rotating order: `direct` calls the handler in this thread
(compute alone); `http` makes the client call (end to end). Two overhead shares:

* unpaired: (median end-to-end - median direct) / median direct, the brief's definition;
* paired: per HTTP call, (end-to-end - handler time measured inside the server) / handler
  time. Both parts come from the same call, so machine noise largely cancels; on this
  shared 2-core machine this is the steadier figure.

Encode/decode costs (safetensors via aligner.serving.protocol) are timed separately on the
same payloads: client encode request, server decode request, server encode response, client
decode response.
"""
from __future__ import annotations

import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python bench/bench_http_overhead.py`

import common  # noqa: E402

WORKLOADS = (  # (name, route, rows, seq)
    ("infer_32x64", "infer", 32, 64),
    ("train_32x64", "train", 32, 64),
    ("train_8x64", "train", 8, 64),
)
TARGET_SHARE = 0.05
CLIP = 0.2
CODEC_ITERS = 20


class ValueModelHandler:
    """A CriticHandler around a megatron value model (see aligner.serving.server.CriticHandler).

    Records the wall time of its last call so the HTTP side can be split into compute and the
    rest. Calls arrive on waitress threads, where megatron's CPU layer must be enabled first.
    """

    def __init__(self, model, lr: float = 1e-5):
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.last_seconds = float("nan")

    def _values(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens [B,S], lengths [B] -> values [B,S] float32, 0 beyond each length."""
        from aligner.models.gpt import position_ids_for
        from aligner.trainers.critic import length_mask

        values = self.model(tokens, position_ids_for(tokens), None).reshape(tokens.shape).float()
        return torch.where(length_mask(lengths, tokens.shape[1]), values, torch.zeros((), dtype=values.dtype))

    def infer(self, tensors):
        from aligner.compat.megatron_cpu import enable_in_current_thread

        enable_in_current_thread()
        start = time.perf_counter()
        self.model.eval()
        with torch.no_grad():
            values = self._values(tensors["tokens"], tensors["lengths"])
        self.last_seconds = time.perf_counter() - start
        return {"values": values}

    def train(self, tensors):
        from aligner.compat.megatron_cpu import enable_in_current_thread
        from aligner.objectives.ppo import clipped_value_loss

        enable_in_current_thread()
        start = time.perf_counter()
        self.model.train()
        values = self._values(tensors["tokens"], tensors["lengths"])
        loss, metrics = clipped_value_loss(values, tensors["prev_values"], tensors["returns"], tensors["mask"], CLIP)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.last_seconds = time.perf_counter() - start
        return {"value_loss": float(loss), "value_clip_fraction": float(metrics["value_clip_fraction"])}

    def save(self, step, path):
        return {"step": step, "path": path}

    def is_ready(self):
        return True

    def metrics(self):
        return {}


def make_payload(route: str, rows: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Real token windows; right-padded rows of varied length, as the actor sends them."""
    tokens = common.token_windows(rows, seq, seed)
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 2 + 1, seq + 1, (rows,), generator=generator)
    lengths[0] = seq
    payload = {"tokens": tokens, "lengths": lengths}
    if route == "train":
        from aligner.trainers.critic import length_mask

        payload["returns"] = torch.randn(rows, seq, generator=generator)
        payload["prev_values"] = torch.randn(rows, seq, generator=generator) * 0.1
        payload["mask"] = length_mask(lengths, seq).float()
    return payload


def codec_times(route: str, payload: dict, response: dict) -> dict[str, float]:
    """Median seconds of each (de)serialisation step of one call, on the protocol functions."""
    from aligner.serving.protocol import decode_tensors, encode_tensors, results_to_metadata

    limit = 1 << 30
    request_body = encode_tensors(payload)
    if route == "infer":
        response_body = encode_tensors(response)
        encode_response = lambda: encode_tensors(response)  # noqa: E731
    else:
        meta = results_to_metadata(response)
        response_body = encode_tensors({}, meta)
        encode_response = lambda: encode_tensors({}, meta)  # noqa: E731
    steps = {
        "client_encode_request": lambda: encode_tensors(payload),
        "server_decode_request": lambda: decode_tensors(request_body, limit),
        "server_encode_response": encode_response,
        "client_decode_response": lambda: decode_tensors(response_body, limit),
    }
    out = {name: statistics.median(common.timed(fn) for _ in range(CODEC_ITERS)) for name, fn in steps.items()}
    out["total"] = sum(out.values())
    out["request_bytes"] = len(request_body)
    out["response_bytes"] = len(response_body)
    return out


def run_dtype(dtype_name: str, args) -> dict:
    from aligner.models.gpt import build_gpt
    from aligner.models.hf.convert import load_hf_weights, model_config_from_hf
    from aligner.serving.client import CriticClient
    from aligner.serving.server import BackgroundServer, create_app

    dtype = common.DTYPES[dtype_name]
    path = common.fixed_model_dir()
    config = model_config_from_hf(path)
    model = build_gpt(config, dtype, scalar_head=True)
    load_hf_weights(path, model, config, scalar_head=True)
    handler = ValueModelHandler(model)
    # One waitress thread per in-flight call is enough here: calls are sequential.
    server = BackgroundServer(create_app(handler), threads=4).start()
    client = CriticClient(server.host, server.port, request_timeout_s=300, total_timeout_s=300)
    results = {}
    try:
        for index, (name, route, rows, seq) in enumerate(WORKLOADS):
            payload = make_payload(route, rows, seq, seed=common.SEED + index)
            lock = threading.Lock()

            def direct():
                with lock:
                    getattr(handler, route)(payload)

            def http():
                if route == "infer":
                    return client.infer(payload["tokens"], payload["lengths"])
                return client.train(payload, idempotency_key=f"bench-{uuid.uuid4().hex}")

            for _ in range(args.warmup):
                direct()
                http()
            direct_s, http_s, inside_s, loads = [], [], [], []
            for rep in range(args.reps):
                loads.append(common.wait_for_quiet(args.quiet_load, args.max_wait))
                order = ("direct", "http") if rep % 2 == 0 else ("http", "direct")
                for which in order:
                    if which == "direct":
                        direct_s.append(common.timed(direct))
                    else:
                        http_s.append(common.timed(http))
                        inside_s.append(handler.last_seconds)
                print(f"  {dtype_name} {name} rep {rep + 1}/{args.reps}: direct {direct_s[-1] * 1e3:.1f} ms, "
                      f"http {http_s[-1] * 1e3:.1f} ms (handler inside {inside_s[-1] * 1e3:.1f} ms)", flush=True)
            response = handler.infer(payload) if route == "infer" else {"value_loss": 0.5, "value_clip_fraction": 0.1}
            codec = codec_times(route, payload, response)
            paired = [(h - i) / i for h, i in zip(http_s, inside_s)]
            unpaired = (statistics.median(http_s) - statistics.median(direct_s)) / statistics.median(direct_s)
            results[name] = {
                "route": route, "rows": rows, "seq": seq,
                "direct_compute_s": common.summarize(direct_s),
                "http_end_to_end_s": common.summarize(http_s),
                "handler_inside_http_s": common.summarize(inside_s),
                "overhead_share_unpaired": unpaired,
                "overhead_share_paired": common.summarize(paired),
                # the HTTP call least disturbed by other jobs (fastest end to end), paired with its own compute
                "overhead_share_least_disturbed_call": paired[http_s.index(min(http_s))],
                "overhead_s_paired_median": statistics.median(h - i for h, i in zip(http_s, inside_s)),
                # conservative: the per-call overhead over the least-disturbed (fastest) compute
                "overhead_share_vs_fastest_compute": statistics.median(h - i for h, i in zip(http_s, inside_s))
                / min(direct_s + inside_s),
                "codec_s": codec,
                "codec_share_of_compute": codec["total"] / statistics.median(inside_s),
                "load_average_1m": loads,
                "target": {"name": f"{name} paired overhead share", "value": statistics.median(paired),
                           "threshold": TARGET_SHARE, "met": bool(statistics.median(paired) <= TARGET_SHARE)},
            }
            r = results[name]
            print(f"  {dtype_name} {name}: overhead paired median {statistics.median(paired):.2%} "
                  f"(min {min(paired):.2%}, max {max(paired):.2%}), unpaired {unpaired:.2%}, "
                  f"vs fastest compute {r['overhead_share_vs_fastest_compute']:.2%}, "
                  f"least-disturbed call {r['overhead_share_least_disturbed_call']:.2%} "
                  f"({r['overhead_s_paired_median'] * 1e3:.1f} ms median per call), "
                  f"codec {codec['total'] * 1e3:.2f} ms = {r['codec_share_of_compute']:.2%} of compute", flush=True)
    finally:
        client.close()
        server.stop()
    return results


def main() -> None:
    parser = common.base_arguments(__doc__.splitlines()[0], reps=7)
    parser.set_defaults(dtype="fp32")
    args = parser.parse_args()
    if args.reps < 3:
        parser.error("--reps must be >= 3 (BENCH_CONFIG)")
    common.quiet_libraries()
    common.set_threads()
    common.start_megatron()
    payload = {"workloads": {}, "target_max_overhead_share": TARGET_SHARE,
               "definition": {
                   "direct": "handler call in the benchmark thread: model compute only",
                   "http": "CriticClient call -> waitress/Flask (create_app) -> same handler -> response decoded",
                   "overhead_share_unpaired": "(median http - median direct) / median direct",
                   "overhead_share_paired": "per http call: (end-to-end - handler time inside the server) / handler time",
                   "overhead_share_vs_fastest_compute": "median per-call overhead seconds / fastest compute "
                                                        "seen (direct or inside the server): an upper estimate",
                   "overhead_share_least_disturbed_call": "paired share of the fastest end-to-end call",
                   "codec_s": "safetensors encode/decode of the same payloads (aligner.serving.protocol), medians",
               },
               "reps": args.reps, "warmup": args.warmup}
    for dtype_name in common.dtypes_of(args.dtype):
        try:
            payload["workloads"][dtype_name] = run_dtype(dtype_name, args)
        except RuntimeError as exc:  # recorded, so one broken dtype does not lose the other's numbers
            print(f"  {dtype_name} failed: {type(exc).__name__}: {exc}", flush=True)
            payload["workloads"][dtype_name] = {"error": f"{type(exc).__name__}: {exc}"}
    path = common.write_result("http_overhead", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
