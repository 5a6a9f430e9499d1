"""Sequence packing of the decoder's training batches (config.train.packing).

Each replica's batch of B examples is packed first-fit decreasing into R rows of
T tokens, R fixed for the run (`psm.data.packed_batches`). The packed step must
train exactly the unpacked step's batches: same examples, same loss (up to float
summation order), attention and positions per example.
"""

import functools

import jax
import numpy as np
import pytest
from tiny_config import tiny_test_config

from configs import glue_bert
from psm.data import orders, packed_batches, packing, tasks
from psm.training import (base_model, distributed, encoder_task, pretrain, replicas, sharding,
                          throughput, trainer)

# tiny:test's examples have 42-62 tokens: rows of 128 hold two or three of them.
T = 128
STEPS = 4


def _config(**overrides):
    return tiny_test_config(**{"task.max_len": T, "mesh.replica": 1, **overrides})


@functools.lru_cache(maxsize=None)
def _task_arrays(max_len: int = T):
    config = _config(**{"task.max_len": max_len})
    task = tasks.get_task(config.task)
    arrays, stats = tasks.encode_split(task, "train", max_len)
    return task, arrays, stats


def _order_kw(config, n):
    return dict(data_seed=config.data_seed, num_replicas=config.num_replicas, num_samples=n,
                batch_size=config.train.batch_size,
                fixed_intra_batch=config.train.fixed_intra_batch)


@functools.lru_cache(maxsize=None)  # the unpacked reference is trained once
def _train(packing: bool, mesh_replica: int = 1, mesh_fsdp: int = 1):
    """STEPS steps of the trainer's own batch path and step on tiny:test (rows of T):
    (per-step losses [STEPS, K], final params, packing plan)."""
    config = _config(**{"train.packing": packing, "mesh.replica": mesh_replica,
                        "mesh.fsdp": mesh_fsdp})
    trainer.validate_config(config)
    task, arrays, _ = _task_arrays()
    n, b = len(arrays["tokens"]), config.train.batch_size
    order_kw = _order_kw(config, n)
    total = orders.steps_per_epoch(n, b) * config.train.epochs
    graphdef, base = pretrain.init_params(base_model._arch(config, task.tokenizer.vocab_size),
                                          config.seed)
    mesh = sharding.mesh_from_config(config, b)
    tx, _ = trainer.make_optimizer(config, total)
    params, opt, state_sh, opt_sh = replicas.place_state(base, config.num_replicas, tx, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    step_fn = replicas.make_train_step(graphdef, tx, state_sh, batch_sh, opt_sh)
    gather, rows, plan = trainer.train_batches(config, arrays, order_kw, mesh,
                                               task.tokenizer.pad_id)
    losses = []
    with jax.set_mesh(mesh):
        for step in range(STEPS):
            idx = orders.batch_indices(step, **order_kw)
            batch = distributed.global_batch(gather, arrays, idx, batch_sh, rows=rows)
            assert batch["tokens"].shape == (config.num_replicas, rows or b, T)
            params, opt, m = step_fn(params, opt, batch)
            losses.append(np.asarray(m["loss"]))
    return np.stack(losses), jax.device_get(params), plan


@pytest.mark.parametrize("mesh", [(1, 1), (2, 2)], ids=["one_device", "replica2_fsdp2"])
def test_packed_steps_have_the_unpacked_losses_and_parameters(mesh):
    """A few steps of tiny:test with rows of T = 128: the packed run computes fewer rows
    and trains the same: per-step losses within rtol 1e-5, parameters within 1e-7 (the
    steps move them by about 1e-4)."""
    ref_loss, ref_params, no_plan = _train(False)
    loss, params, plan = _train(True, *mesh)
    assert no_plan is None
    assert plan["rows"] < _config().train.batch_size  # it really packs
    assert plan["rows"] % mesh[1] == 0  # the fsdp axis splits the rows
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _segments(batch, g, r):
    """[(segment id, start, length)] of row r of replica g of a packed batch."""
    seg = batch["segment_ids"][g, r]
    out = []
    for s in range(1, seg.max() + 1):
        where = np.nonzero(seg == s)[0]
        assert len(where) and np.all(np.diff(where) == 1), "a segment is one contiguous run"
        out.append((s, int(where[0]), len(where)))
    return out


@pytest.mark.parametrize("max_len", [T, 48], ids=["fits", "truncated"])
def test_packed_batch_holds_each_example_once_with_its_own_segment_and_positions(max_len):
    """Every example of the batch appears once, with its tokens, targets and loss mask
    (as its unpacked row, truncation included), its own segment id and positions from 0;
    padding slots (-1) add nothing; the rest of the row is padding."""
    task, arrays, stats = _task_arrays(max_len)
    if max_len == 48:  # examples longer than T are truncated at encoding, as unpacked
        assert stats["truncated"] > 0
    pad = task.tokenizer.pad_id
    lengths = packed_batches.example_lengths(arrays)
    assert lengths.max() <= max_len
    idx = np.array([[5, 17, -1, 3, 40, 2, 88, 61], [9, -1, -1, -1, 0, 1, 95, 70]])
    rows = max(len(packing.first_fit_decreasing(np.where(i >= 0, lengths[i], 0), max_len))
               for i in idx)
    batch = packed_batches.gather_packed(arrays, idx, num_rows=rows, pad_id=pad)
    assert batch["tokens"].shape == (2, rows, max_len)
    for g, members in enumerate(idx):
        seen = []
        for r in range(rows):
            used = 0
            for s, start, n in _segments(batch, g, r):
                assert start == used  # packed from the row's start, no gaps
                found = [i for i in members if i >= 0 and lengths[i] == n and i not in seen
                         and np.array_equal(batch["tokens"][g, r, start:start + n],
                                            arrays["tokens"][i, :n])]
                assert found, f"segment {s} of row {r} is none of the batch's examples"
                i = found[0]
                seen.append(i)
                sl = slice(start, start + n)
                np.testing.assert_array_equal(batch["targets"][g, r, sl], arrays["targets"][i, :n])
                np.testing.assert_array_equal(batch["loss_mask"][g, r, sl],
                                              arrays["loss_mask"][i, :n])
                np.testing.assert_array_equal(batch["positions"][g, r, sl], np.arange(n))
                used += n
            rest = slice(used, max_len)
            assert np.all(batch["segment_ids"][g, r, rest] == 0)
            assert np.all(batch["tokens"][g, r, rest] == pad)
            assert np.all(batch["targets"][g, r, rest] == pad)
            assert np.all(batch["loss_mask"][g, r, rest] == 0)
        assert sorted(seen) == sorted(int(i) for i in members if i >= 0)
    # The loss tokens are the unpacked batch's; -1 slots are as if absent.
    unpacked = tasks.gather_batch(arrays, idx)
    np.testing.assert_array_equal(batch["loss_mask"].sum(axis=(1, 2)),
                                  unpacked["loss_mask"].sum(axis=(1, 2)))
    real = packed_batches.gather_packed(arrays, idx[:1, idx[0] >= 0], num_rows=rows, pad_id=pad)
    for key in packing.ARRAY_KEYS:
        np.testing.assert_array_equal(batch[key][:1], real[key])


def test_rows_for_run_is_the_most_any_batch_of_the_run_needs():
    """R is the maximum over every step's [K, B] batch (as the train loop draws them, all
    epochs, both order modes): every batch packs into R rows, the fullest needs exactly R,
    and a batch that does not fit is refused, naming it."""
    _, arrays, _ = _task_arrays()
    lengths = packed_batches.example_lengths(arrays)
    config = _config()
    for fixed in (False, True):
        kw = {**_order_kw(config, len(lengths)), "fixed_intra_batch": fixed}
        plan = packed_batches.rows_for_run(lengths, T, epochs=config.train.epochs, **kw)
        total = orders.steps_per_epoch(len(lengths), kw["batch_size"]) * config.train.epochs
        needed = [max(len(packing.first_fit_decreasing(np.where(i >= 0, lengths[i], 0), T))
                      for i in orders.batch_indices(step, **kw)) for step in range(total)]
        assert plan["rows"] == plan["rows_needed"] == max(needed) < kw["batch_size"]
        assert plan["batches"] == total * config.num_replicas
        np.testing.assert_allclose(plan["rows_mean"], np.mean(needed))
        for step in range(total):  # no batch of the run can overflow R rows
            packed_batches.gather_packed(arrays, orders.batch_indices(step, **kw),
                                         num_rows=plan["rows"])
        fullest = orders.batch_indices(int(np.argmax(needed)), **kw)
        with pytest.raises(ValueError, match=r"needs \d+ packed rows .* num_rows="):
            packed_batches.gather_packed(arrays, fullest, num_rows=plan["rows"] - 1)
    # The mesh's fsdp axis splits the rows: R is rounded up to a multiple of it.
    odd = packed_batches.rows_for_run(lengths, T, epochs=1, multiple_of=3,
                                      **_order_kw(config, len(lengths)))
    assert odd["rows"] % 3 == 0 and odd["rows"] - 3 < odd["rows_needed"] <= odd["rows"]
    # What packing saves, from the lengths: padding share of the slots before and after.
    b, tokens = plan["batch_size"], config.train.epochs * config.num_replicas * lengths.sum()
    np.testing.assert_allclose(plan["padding_unpacked"], 1 - tokens / (plan["batches"] * b * T))
    np.testing.assert_allclose(plan["padding_packed"],
                               1 - tokens / (plan["batches"] * plan["rows"] * T))
    assert plan["slots_saved"] == 1 - plan["rows"] / b


def test_first_fit_decreasing_places_longest_first_and_refuses_an_overlong_example():
    assert packing.first_fit_decreasing([3, 7, 0, 5, 2, 4], 10) == [[1, 0], [3, 5], [4]]
    with pytest.raises(ValueError, match="example 1 has 11 tokens > seq_len=10"):
        packing.first_fit_decreasing([3, 11], 10)


def test_global_batch_gives_each_shard_the_rows_of_the_packed_batch():
    """On a (replica 2, fsdp 2) mesh the packed global batch equals the packed batch put
    on the mesh (a shard's rows come from all B examples of its replicas); the unpacked
    one still equals the unpacked batch."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (simulated) devices; tests/conftest.py sets them up")
    task, arrays, _ = _task_arrays()
    config = _config()
    kw = _order_kw(config, len(arrays["tokens"]))
    plan = packed_batches.rows_for_run(packed_batches.example_lengths(arrays), T, epochs=1,
                                       multiple_of=2, **kw)
    gather = functools.partial(packed_batches.gather_packed, num_rows=plan["rows"],
                               pad_id=task.tokenizer.pad_id)
    mesh = sharding.make_mesh(config.num_replicas, config.train.batch_size, replica=2, fsdp=2)
    idx = orders.batch_indices(3, **kw)
    got = distributed.global_batch(gather, arrays, idx, sharding.batch_sharding(mesh),
                                   rows=plan["rows"])
    want = gather(arrays, idx)
    assert want["tokens"].shape[1] == plan["rows"]
    unpacked = distributed.global_batch(tasks.gather_batch, arrays, idx,
                                        sharding.batch_sharding(mesh))
    for got_, want_ in ((got, want), (unpacked, tasks.gather_batch(arrays, idx))):
        for key in packing.ARRAY_KEYS:
            assert got_[key].shape == want_[key].shape
            np.testing.assert_array_equal(np.asarray(got_[key]), want_[key])


def test_token_counts_of_packed_batches():
    """All tokens: R * T slots per replica (what the packed step computes); loss tokens:
    the batch's, as unpacked."""
    task, arrays, _ = _task_arrays()
    rows = 5
    counter = throughput.BatchTokenCounter(tasks.gather_batch, arrays, rows=rows)
    for idx in (np.array([[0, 3, 6, 9, 12, 15, 18, 21], [2, 2, 5, 7, 1, 4, 8, 11]]),
                np.array([[1, -1, -1, -1, -1, -1, -1, -1], [4, 0, -1, 90, 91, 92, 93, 94]])):
        packed = packed_batches.gather_packed(arrays, idx, num_rows=rows,
                                              pad_id=task.tokenizer.pad_id)
        assert counter(idx) == throughput.token_counts(packed)
        assert counter(idx)[0] == idx.shape[0] * rows * T
        assert counter(idx)[1] == throughput.token_counts(tasks.gather_batch(arrays, idx))[1]


def test_packing_config_values_are_checked_naming_the_key():
    config = _config()
    with config.ignore_type():
        config.train.packing = "yes"
    with pytest.raises(ValueError, match=r"config\.train\.packing must be True or False, "
                                         r"got 'yes'"):
        trainer.validate_config(config)
    bert = glue_bert.get_config("sst2,smoke")
    bert.train.packing = True
    with pytest.raises(ValueError, match=r"config\.train\.packing=True .* BERT encoder"):
        encoder_task.validate_config(bert)


def test_paper_decoder_configs_pack_and_tiny_and_bert_do_not():
    """Packing is on for the paper's decoder tasks; off for configs/tiny.py (its rows of
    72 tokens hold one example each, so packing saves nothing there and its recorded
    numbers stay as they are) and for the BERT path."""
    import importlib
    for module, arg in (("gsm8k", None), ("math", None), ("alpaca", None),
                        ("humaneval", None), ("glue", None), ("gsm8k", "smoke")):
        assert importlib.import_module(f"configs.{module}").get_config(arg).train.packing
    assert not tiny_test_config().train.packing
    assert not importlib.import_module("configs.tiny").get_config().train.packing
    assert not glue_bert.get_config().train.packing
