"""Parallel training from config: the real loop (``experiments/train.py``) on the 4 host devices
of ``conftest.py`` gives the losses of one device; checkpoints resume under a mesh; the ``ring``
variant and ``jattn.attention(implementation="ring")`` equal full attention; bad ``parallel``
settings are errors that name the key."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

import jattn
from jattn import masks, nn, variants
from jattn.parallel import make_mesh
from jattn.train.loop import load_run

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "parallel_tiny.yaml")
# A constant rate, so that a run stopped at step 2 and resumed to 4 follows the same schedule.
CONSTANT = "optimizer.schedule=constant"
ONE_DEVICE = ["parallel.mesh={}", "parallel.state=replicated", "attention.variant=full"]


def _train_script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "experiments" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _losses(run_dir: pathlib.Path, split: str) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line["split"] == split]


@pytest.fixture(scope="module", autouse=True)
def compile_once(tmp_path_factory):
    """A persistent compilation cache for this module: a resumed run loads the steps its first
    segment compiled instead of compiling them again (compilation is most of these tests' time)."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory) -> pathlib.Path:
    """Four steps of parallel_tiny on one device with full attention: the reference."""
    run_dir = tmp_path_factory.mktemp("one_device")
    assert _train_script()([CONFIG, CONSTANT, *ONE_DEVICE, "--run-dir", str(run_dir)]) == 0
    return run_dir


@pytest.mark.slow
def test_data_parallel_training_matches_one_device(one_device_run, tmp_path):
    run_dir = tmp_path / "data4"
    overrides = ["parallel.mesh={data: -1}", "parallel.state=replicated", "attention.variant=full"]
    assert _train_script()([CONFIG, CONSTANT, *overrides, "--run-dir", str(run_dir)]) == 0
    for split in ("train", "val"):
        np.testing.assert_allclose(_losses(run_dir, split), _losses(one_device_run, split), rtol=1e-5)


def test_ring_and_sharded_state_resume_on_a_2x2_mesh(one_device_run, tmp_path):
    """parallel_tiny as shipped (ring over `seq`, batch and sharded state over `data`): stopped
    after its step-2 checkpoint, resumed to step 4, it has the losses of the one-device run."""
    run_dir = tmp_path / "ring"
    assert _train_script()([CONFIG, CONSTANT, "train.steps=2", "--run-dir", str(run_dir)]) == 0
    assert _train_script()([CONFIG, CONSTANT, "--run-dir", str(run_dir)]) == 0
    np.testing.assert_allclose(_losses(run_dir, "train"), _losses(one_device_run, "train"), rtol=1e-5)
    np.testing.assert_allclose(_losses(run_dir, "val")[-1], _losses(one_device_run, "val")[-1], rtol=1e-5)
    # The sharded checkpoint loads on one device; without a mesh the ring variant runs one-device.
    _, model, step = load_run(run_dir)
    _, reference, _ = load_run(one_device_run)
    tokens = jnp.arange(24, dtype=jnp.int32)[None] % 16  # [1, T]
    assert step == 4
    np.testing.assert_allclose(model(tokens), reference(tokens), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ring_variant_model_matches_full_attention_forward_and_gradient():
    def model(variant):
        return nn.DecoderLM(16, max_len=40, width=16, depth=1, num_heads=2, mlp_dim=32,
                            variant=variants.get_variant(variant), position="rotary", dropout_rate=0.0,
                            num_kv_heads=1, dtype=jnp.float32, rngs=nnx.Rngs(0))  # fmt: skip

    tokens = jax.random.randint(jax.random.key(1), (4, 40), 0, 16)  # [B, T]; T=40 pads to 48 on 2x2

    def loss_and_grads(m):
        graphdef, params = nnx.split(m, nnx.Param)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    expected = loss_and_grads(model("full"))
    with jax.set_mesh(make_mesh({"data": 2, "seq": 2})):
        got = loss_and_grads(model("ring"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, expected)


def test_attention_implementation_ring_under_a_mesh():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 30, 4, 8))  # each [B, T, N, H]
    mask = masks.causal() & masks.padding(jnp.array([17, 30]))
    expected = jattn.attention(q, k, v, mask=mask, implementation="xla")
    with jax.set_mesh(make_mesh({"seq": 4})):
        got = jattn.attention(q, k, v, mask=mask, implementation="ring")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match=r"no mesh is set: call it inside `with jax.set_mesh"):
        jattn.attention(q, k, v, implementation="ring")
    with jax.set_mesh(make_mesh({"data": 4})), pytest.raises(NotImplementedError, match="none named 'seq'"):
        jattn.attention(q, k, v, implementation="ring")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.mesh={data: 2, sequence: 2}"], "parallel.mesh has unknown axis name(s) ['sequence']"),
        (["parallel.mesh={data: 8}"], "config key 'parallel.mesh': axes={'data': 8} needs 8 devices"),
        (["parallel.mesh={data: 0}"], "config key 'parallel.mesh': mesh axis 'data' must have a positive"),
        (["parallel.mesh={data: 4}"], "config key 'attention.variant': 'ring'"),
        (["parallel.mesh={data: 4}", *ONE_DEVICE[1:], "train.batch_size=6"], "config key 'train.batch_size'"),
        (["parallel.mesh={seq: 4}"], "parallel.state='sharded' splits the state over the 'data' mesh axis"),
        (["parallel.distributed={process_id: 0}"], "key 'parallel.distributed': multi-process settings"),
    ],
)
def test_bad_parallel_config_names_the_key(overrides, message, tmp_path, capsys):
    assert _train_script()([CONFIG, *overrides, "--run-dir", str(tmp_path / "bad")]) == 2
    assert message in capsys.readouterr().err
