"""ONNX Runtime and precision: the backend and dtype rules, the graph cache, and the start-up
check that refuses a graph (or a half-precision model) whose vectors differ from torch's.

The GPU paths cannot run here (no CUDA in CI); their rules (auto picks, batch sizes, dtype
refusals) and the check they share with the ONNX path are tested on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stratacache import onnx_runtime
from stratacache.config import Settings
from stratacache.embed import Encoder, default_max_batch, pick_backend, pick_dtype
from stratacache.errors import InvalidArgument

TEXTS = ["How do I bake bread?", "What is the capital of France? " * 60, "¿Qué hora es?", "a"]


@pytest.fixture(scope="module")
def torch_encoder() -> Encoder:
    return Encoder("default", device="cpu", backend="torch", warmup=False)


def _graph(cache: Path) -> Path:
    [graph] = [p for p in cache.glob("*.onnx") if "-embed-" in p.name]
    return graph


def test_auto_rules_pick_by_device() -> None:
    assert pick_backend("auto", "cpu") == "onnx"
    assert pick_backend("auto", "cuda") == pick_backend("auto", "cuda:1") == "torch"
    assert pick_backend("onnx", "cuda") == "onnx" and pick_backend("torch", "cpu") == "torch"
    assert pick_dtype("auto", "cpu") == "float32" and pick_dtype("auto", "cuda:0") == "float16"
    assert pick_dtype("bfloat16", "cuda") == "bfloat16"
    assert default_max_batch("cpu") == 32 and default_max_batch("cuda:1") == 256
    with pytest.raises(InvalidArgument, match="--embed-dtype float16 needs a CUDA device"):
        pick_dtype("float16", "cpu")
    with pytest.raises(InvalidArgument, match="--embed-dtype must be one of"):
        pick_dtype("int4", "cuda")
    with pytest.raises(InvalidArgument, match="--embed-backend must be one of"):
        pick_backend("tensorrt", "cpu")
    with pytest.raises(ValueError, match="embed_backend must be one of auto, torch, onnx"):
        Settings(embed_backend="tensorrt")
    with pytest.raises(ValueError, match="embed_max_batch must be >= 1"):
        Settings(embed_max_batch=0)


def test_half_precision_is_refused_on_the_cpu() -> None:
    with pytest.raises(InvalidArgument, match="needs a CUDA device"):
        Encoder("default", device="cpu", dtype="float16")


def test_onnx_vectors_match_torch(encoder: Encoder, torch_encoder: Encoder) -> None:
    assert encoder.backend == "onnx" and encoder.dtype == "float32"
    assert encoder.identity == torch_encoder.identity  # same model, same data directories
    onnx, torch = encoder.encode(TEXTS), torch_encoder.encode(TEXTS)
    assert onnx.dtype == np.float32 and onnx.shape == (4, 384)
    assert onnx_runtime.min_cosine(torch, onnx) >= onnx_runtime.MIN_COSINE_ONNX
    one = encoder.encode(TEXTS[:1])  # unpadded, alone
    assert onnx_runtime.min_cosine(torch[:1], one) >= onnx_runtime.MIN_COSINE_ONNX
    whole = encoder.encode_whole(TEXTS)
    assert whole[1] is None and all(v is not None for i, v in enumerate(whole) if i != 1)


def test_a_second_start_reuses_the_cached_graph(encoder: Encoder, onnx_cache: Path) -> None:
    graph = _graph(onnx_cache)
    before = graph.stat()
    again = Encoder("default", device="cpu", backend="onnx", cache_dir=onnx_cache, warmup=False)
    assert again.backend == "onnx"
    after = graph.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_corrupt_cached_graph_is_exported_again(encoder: Encoder, onnx_cache: Path,
                                                  tmp_path: Path) -> None:
    graph = tmp_path / _graph(onnx_cache).name
    graph.write_bytes(b"\x08\x07 not an onnx graph")
    again = Encoder("default", device="cpu", backend="onnx", cache_dir=tmp_path, warmup=False)
    assert again.backend == "onnx" and graph.stat().st_size > 10 << 20
    assert not list(tmp_path.glob("*.tmp"))  # written beside it, then renamed
    np.testing.assert_allclose(again.encode(TEXTS), encoder.encode(TEXTS), atol=1e-5)


def test_a_graph_that_computes_other_vectors_is_refused(encoder: Encoder, onnx_cache: Path,
                                                        tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    graph = _graph(onnx_cache)
    model = onnx.load(str(graph))
    # Perturb the largest weight by 5 %: a graph that loads and runs, but is not the model.
    largest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = numpy_helper.to_array(largest)
    noise = np.random.default_rng(0).normal(0, 0.05 * weights.std(), weights.shape)
    largest.CopyFrom(numpy_helper.from_array((weights + noise).astype(weights.dtype),
                                             largest.name))
    onnx.save(model, str(tmp_path / graph.name))

    with pytest.raises(InvalidArgument, match="does not reproduce the model's vectors.*"
                                              "--embed-backend torch"):
        Encoder("default", device="cpu", backend="onnx", cache_dir=tmp_path, warmup=False)
    fallback = Encoder("default", device="cpu", backend="auto", cache_dir=tmp_path,
                       warmup=False)
    assert fallback.backend == "torch"  # auto: torch, and the log says why


def test_the_check_thresholds_accept_half_precision_and_refuse_drift(
        torch_encoder: Encoder) -> None:
    reference = torch_encoder.encode(TEXTS)
    half = reference.astype(np.float16).astype(np.float32)  # what float16 rounding costs
    assert onnx_runtime.check_vectors(reference, half, least=onnx_runtime.MIN_COSINE_HALF,
                                      what="float16", remedy="x") >= onnx_runtime.MIN_COSINE_HALF
    drifted = reference + np.random.default_rng(1).normal(0, 0.02, reference.shape)
    with pytest.raises(InvalidArgument, match="least cosine 0.9"):
        onnx_runtime.check_vectors(reference, drifted.astype(np.float32),
                                   least=onnx_runtime.MIN_COSINE_HALF, what="float16",
                                   remedy="serve with --embed-dtype float32")
    with pytest.raises(InvalidArgument, match="non-finite"):
        onnx_runtime.check_vectors(reference, reference * np.nan, least=0.9, what="x",
                                   remedy="y")


def test_onnx_verifier_scores_match_torch(verifier_folder: Path, onnx_cache: Path) -> None:
    from stratacache.verify import Verifier

    items = [("How do I learn Python?", "Fastest way to learn Python?", 0.9),
             ("India nukes Pakistan", "Pakistan nukes India", 0.95)]
    torch = Verifier(verifier_folder, device="cpu")
    onnx = Verifier(verifier_folder, device="cpu", backend="onnx", cache_dir=onnx_cache)
    assert onnx.backend == "onnx" and not onnx.quantized and not onnx.identity.int8
    assert list(onnx_cache.glob("*-verify-*.onnx"))
    np.testing.assert_allclose(onnx.score(items), torch.score(items), atol=1e-4)
    assert Verifier(verifier_folder, device="cpu", backend="auto").backend == "torch"
    with pytest.raises(InvalidArgument, match="does not reproduce the model's scores"):
        onnx_runtime.check_scores(torch.score(items), torch.score(items) + 0.01,
                                  most=onnx_runtime.MAX_SCORE_DIFF_ONNX, what="x", remedy="y")
