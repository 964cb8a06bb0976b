"""Data parallelism on the 4-device CPU mesh, multi-process start-up, mesh helpers."""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jattn.core.multihead import init_multi_head_attention, multi_head_attention
from jattn.parallel import distributed_settings, make_mesh, place_state, shard_batch

NUM_DEVICES = 4


def _problem(seed=0, batch=8, length=16, width=16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, length, width)).astype(np.float32)
    y = rng.standard_normal((batch, length, width)).astype(np.float32)
    return {"x": x, "y": y}


def _train(state, batches, tx):
    """Loss of each of a few Adam steps on a one-layer causal attention regression."""

    @jax.jit
    def step(state, batch):
        def loss_fn(params):
            out = multi_head_attention(params, batch["x"], num_heads=2, mask=None)
            return jnp.mean((out - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    losses = []
    for batch in batches:
        state, loss = step(state, batch)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_data_parallel_training_matches_single_device(mode):
    if jax.device_count() < NUM_DEVICES:
        pytest.skip("needs 4 devices")
    tx = optax.adam(1e-2)
    params = init_multi_head_attention(jax.random.key(0), 16, num_heads=2)
    state = {"params": params, "opt_state": tx.init(params)}
    batches = [_problem()] * 3  # the same batch: the loss must fall
    single = _train(state, batches, tx)
    mesh = make_mesh({"data": NUM_DEVICES}, devices=jax.devices()[:NUM_DEVICES])
    placed = place_state(state, mesh, mode=mode)
    sharded_batches = [shard_batch(b, mesh) for b in batches]
    assert sharded_batches[0]["x"].sharding.spec[0] == "data"
    parallel = _train(placed, sharded_batches, tx)
    np.testing.assert_allclose(parallel, single, rtol=1e-5)
    assert single[-1] < single[0]  # it trains


def test_sharded_state_splits_large_arrays_and_replicates_scalars():
    mesh = make_mesh({"data": NUM_DEVICES}, devices=jax.devices()[:NUM_DEVICES])
    placed = place_state({"w": np.zeros((6, 8)), "count": np.zeros(())}, mesh, mode="sharded")
    assert tuple(placed["w"].sharding.spec) == (None, "data")
    assert tuple(placed["count"].sharding.spec) == ()


def test_bad_input_names_the_argument():
    mesh = make_mesh({"data": NUM_DEVICES}, devices=jax.devices()[:NUM_DEVICES])
    with pytest.raises(ValueError, match=r"batch\['x'\] has shape \(6, 2\).*divisible by the 4 devices"):
        shard_batch({"x": np.zeros((6, 2))}, mesh)
    with pytest.raises(ValueError, match="axis_name='batch' is not an axis of the mesh"):
        shard_batch({"x": np.zeros((8, 2))}, mesh, axis_name="batch")
    with pytest.raises(ValueError, match="mode must be"):
        place_state({}, mesh, mode="zero")
    with pytest.raises(ValueError, match=r"needs 6 devices, but there are 4"):
        make_mesh({"data": 2, "seq": 3}, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="at most one mesh axis may have size -1"):
        make_mesh({"data": -1, "seq": -1})
    with pytest.raises(ValueError, match="devices must be distinct devices, at least one"):
        make_mesh({"data": -1}, devices=[])
    with pytest.raises(ValueError, match="devices must be distinct devices"):
        make_mesh({"data": 2}, devices=[jax.devices()[0]] * 2)
    assert make_mesh({"data": np.int64(2)}, devices=jax.devices()[:2]).shape == {"data": 2}


def test_distributed_settings_from_config_and_environment():
    env = {"JATTN_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JATTN_NUM_PROCESSES": "2", "JATTN_PROCESS_ID": "1"}
    assert distributed_settings(environ=env) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 2,
        "process_id": 1,
    }
    assert distributed_settings({"process_id": 0}, environ=env)["process_id"] == 0
    assert distributed_settings(environ={}) == {}
    with pytest.raises(ValueError, match=r"incomplete.*\['process_id'\] missing.*JATTN_PROCESS_ID"):
        distributed_settings({"coordinator_address": "h:1", "num_processes": 2}, environ={})
    with pytest.raises(ValueError, match="JATTN_NUM_PROCESSES must be an int, got 'two'"):
        distributed_settings(environ={**env, "JATTN_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="unknown distributed setting"):
        distributed_settings({"rank": 0}, environ={})
    with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes=2\), got 5"):
        distributed_settings({"process_id": 5}, environ=env)


def test_local_device_ids_alone_is_refused_by_name(monkeypatch):
    """On its own it cannot start a multi-process run; JAX's own error named neither the variable
    nor the config key."""
    from jattn.parallel.training import DistributedConfig, start_processes

    with pytest.raises(ValueError, match=r"parallel.distributed.*local_device_ids.*enabled: true"):
        start_processes(DistributedConfig(local_device_ids=(0,)))
    monkeypatch.setenv("JATTN_LOCAL_DEVICE_IDS", "0")
    with pytest.raises(ValueError, match="JATTN_LOCAL_DEVICE_IDS"):
        start_processes(DistributedConfig())
    assert start_processes(DistributedConfig(enabled=False)) == {}


_WORKER = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    import optax
    from jattn.core.multihead import init_multi_head_attention
    from jattn.parallel import initialize, make_mesh, place_state, shard_batch
    sys.path.insert(0, sys.argv[1])
    from test_parallel_data import _problem, _train

    initialize()
    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
    tx = optax.adam(1e-2)
    params = init_multi_head_attention(jax.random.key(0), 16, num_heads=2)
    mesh = make_mesh({"data": -1})
    state = place_state({"params": params, "opt_state": tx.init(params)}, mesh)
    share = slice(4 * jax.process_index(), 4 * (jax.process_index() + 1))  # this host's rows
    batches = [shard_batch({k: v[share] for k, v in _problem().items()}, mesh)] * 3
    print("LOSSES", *_train(state, batches, tx))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(worker: str) -> list[str]:
    """Run ``worker`` in two local processes with two CPU devices each; their standard outputs."""
    address = f"127.0.0.1:{_free_port()}"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "JATTN_COORDINATOR_ADDRESS": address,
        "JATTN_NUM_PROCESSES": "2",
    }
    tests_dir = os.path.dirname(__file__)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", worker, tests_dir],
            env={**env, "JATTN_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        outputs.append(stdout)
    return outputs


@pytest.mark.slow
def test_two_processes_train_together_and_agree_on_the_loss():
    """Two local processes, two CPU devices each, one 4-device data-parallel mesh."""
    outputs = [
        [float(x) for x in stdout.split("LOSSES")[1].split()] for stdout in _run_two_processes(_WORKER)
    ]
    assert outputs[0] == outputs[1]
    tx = optax.adam(1e-2)
    params = init_multi_head_attention(jax.random.key(0), 16, num_heads=2)
    single = _train({"params": params, "opt_state": tx.init(params)}, [_problem()] * 3, tx)
    np.testing.assert_allclose(outputs[0], single, rtol=1e-5)


_BATCH_WORKER = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jattn.parallel import initialize, shard_batch
    from jattn.parallel.training import ParallelConfig, Placement

    initialize()
    batch = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # the global batch, on every process
    for mesh in ({"data": 2, "seq": 2}, {"seq": 2, "data": 2}):
        placement = Placement.from_config(ParallelConfig(mesh=mesh), batch_size=8)
        from_global = placement.shard({"x": batch})["x"]
        # shard_batch takes this process's rows: those of the data positions its devices occupy.
        data_axis = placement.mesh.axis_names.index("data")
        positions = sorted({i[data_axis] for i, d in np.ndenumerate(placement.mesh.devices)
                            if d.process_index == jax.process_index()})
        share = np.concatenate([batch[4 * p : 4 * (p + 1)] for p in positions])
        from_share = shard_batch({"x": share}, placement.mesh)["x"]
        with placement.activate():
            for name, x in (("global", from_global), ("share", from_share)):
                rows = jax.jit(lambda a: a @ jnp.ones(3), out_shardings=jax.P())(x)
                print("ROWS", list(mesh), name, x.shape, *np.asarray(rows).tolist())
    """
)


@pytest.mark.slow
def test_batches_keep_every_row_whichever_axis_spans_the_processes():
    """With ``seq`` as the mesh's first axis each process spans ``data``; with ``data`` first each
    holds half of it. Either way every process sees the whole global batch, in order."""
    expected = np.arange(8 * 3, dtype=np.float32).reshape(8, 3).sum(axis=1).tolist()
    for stdout in _run_two_processes(_BATCH_WORKER):
        lines = [line.split(maxsplit=1)[1] for line in stdout.splitlines() if line.startswith("ROWS")]
        assert len(lines) == 4, stdout
        for line in lines:
            assert line.endswith(f"(8, 3) {' '.join(map(str, expected))}"), line
