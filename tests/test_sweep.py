"""jaxscanvi.sweep: K models in one vmapped program equal K single train() runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxscanvi as js
from jaxscanvi import sweep
from jaxscanvi.errors import InputError
from jaxscanvi.sweep import _memory

NET = dict(n_hidden=32, n_latent=5)
FIT = dict(batch_size=64, progress_bar=False, devices=1)


@pytest.fixture(scope="module")
def data():
    adata = js.synthetic_atlas(
        n_cells=300,
        n_genes=100,
        n_batches=2,
        n_lineages=2,
        types_per_lineage=2,
        seed=0,
        markers_per_type=10,
    )
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    hide = np.random.default_rng(0).random(adata.n_obs) < 0.5
    adata.obs["labels"] = np.where(hide, "Unknown", adata.obs["cell_type"])
    scvi_data = adata.copy()
    js.SCVI.setup_anndata(scvi_data, batch_key="batch", labels_key="cell_type")
    js.SCANVI.setup_anndata(
        adata, labels_key="labels", unlabeled_category="Unknown", batch_key="batch"
    )
    return scvi_data, adata


def assert_same_model(got, want, rtol=2e-4, atol=2e-5):
    """Parameters, mutable state and history of two trained models agree."""
    for name, a, b in (("params", got.params, want.params), ("state", got.state, want.state)):
        la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
        assert len(la) == len(lb), name
        for (path, x), y in zip(la, lb):
            np.testing.assert_allclose(
                np.asarray(x),
                np.asarray(y),
                rtol=rtol,
                atol=atol,
                err_msg=f"{name}{jax.tree_util.keystr(path)}",
            )
    assert list(got.history.to_frame().columns) == list(want.history.to_frame().columns)
    assert list(got.history.to_frame().index) == list(want.history.to_frame().index)
    cols = [c for c in want.history.to_frame().columns if c != "epoch_seconds"]
    np.testing.assert_allclose(
        got.history.to_frame()[cols].to_numpy(float),
        want.history.to_frame()[cols].to_numpy(float),
        rtol=rtol,
        atol=atol,
    )
    np.testing.assert_array_equal(got.train_indices, want.train_indices)
    np.testing.assert_array_equal(got.validation_indices, want.validation_indices)
    assert got.is_trained and int(got.train_state.step) == int(want.train_state.step)


def test_scvi_members_equal_their_single_runs(data):
    """Own seeds and orders: member k is make(seed).train(seed=seed, plan_kwargs=h),
    with early stopping and the LR plateau acting per member. The plateau (on the
    rising KL weight) lowers the rate of members 0 and 2 every epoch; member 1's
    rate is at lr_min, so its monitored "lr" never improves and it stops after 3
    epochs, its parameters held while the others train on."""
    adata, _ = data
    members = [
        {"seed": 0, "lr": 1e-3},
        {"seed": 1, "lr": 1e-4, "weight_decay": 1e-3},
        {"seed": 2, "max_kl_weight": 0.5, "n_epochs_kl_warmup": 2},
    ]
    plan = {
        "reduce_lr_on_plateau": True,
        "lr_scheduler_metric": "kl_weight",
        "lr_patience": 0,
        "lr_min": 1e-4,
    }
    kw = dict(
        max_epochs=5,
        early_stopping=True,
        early_stopping_monitor="lr",
        early_stopping_patience=2,
        **FIT,
    )
    out = sweep.train_many(
        lambda s: js.SCVI(adata, seed=s, **NET),
        members=members,
        order="per_model",
        plan_kwargs=plan,
        **kw,
    )
    assert [m.history.n_epochs for m in out.models] == [5, 3, 5]
    assert len(out.history) == 13
    assert {"member", "seed", "hp_lr", "hp_max_kl_weight", "lr", "elbo_validation"} <= set(
        out.history.columns
    )
    assert out.models[0].history.to_frame()["lr"].iloc[-1] < 1e-3
    for model, m in zip(out.models, members):
        single = js.SCVI(adata, seed=m["seed"], **NET).train(
            seed=m["seed"],
            plan_kwargs={**plan, **{k: v for k, v in m.items() if k != "seed"}},
            **kw,
        )
        assert_same_model(model, single)
    # the members really differ: different seeds and hyperparameters train differently
    z = [np.asarray(m.get_latent_representation()) for m in out.models]
    assert not np.allclose(z[0], z[2], atol=1e-3)
    assert out.history.groupby("member")["kl_weight"].last().tolist() == pytest.approx(
        [4 / 400, 2 / 400, 0.5]
    )
    last = [m.history.to_frame()["elbo_validation"].iloc[-1] for m in out.models]
    assert out.final["elbo_validation"].tolist() == last
    assert out.best("elbo_validation") is out.models[int(np.argmin(last))]
    assert out.members.loc[1, "weight_decay"] == 1e-3


def _centre(outputs, batch, params):
    del batch, params
    return jnp.mean(outputs["qz_m"] ** 2)


@pytest.fixture(scope="module")
def scanvi_sweep(data):
    _, adata = data
    start = js.SCANVI(adata, seed=0, **NET)  # every member starts from this model
    members = [
        {"seed": 0, "classification_ratio": 10.0, "loss_weights.centre": 0.5},
        {"seed": 0, "classification_ratio": 50.0, "loss_weights.centre": 2.0},
        {"seed": 3, "classification_ratio": 50.0, "loss_weights.centre": 2.0},
    ]
    out = sweep.train_many(
        start, members=members, max_epochs=2, loss_terms={"centre": _centre}, **FIT
    )
    return out, members


def test_scanvi_shared_order_with_loss_term_equals_single_runs(data, scanvi_sweep):
    """Shared order (data_seed = the first seed) with a custom loss term: a member of
    that seed equals train(seed=0) with its ratio and term weight."""
    _, adata = data
    out, members = scanvi_sweep
    for model, m in list(zip(out.models, members))[:1]:
        single = js.SCANVI(adata, seed=0, **NET).train(
            max_epochs=2,
            seed=0,
            plan_kwargs={"classification_ratio": m["classification_ratio"]},
            loss_terms={"centre": _centre},
            loss_weights={"centre": m["loss_weights.centre"]},
            **FIT,
        )
        assert_same_model(model, single)
        assert model.temperature == pytest.approx(single.temperature, rel=1e-3)
        assert model.loss_term_names == ("centre",)
    assert not np.allclose(
        np.asarray(out.models[0].history.to_frame()["train_loss"]),
        np.asarray(out.models[1].history.to_frame()["train_loss"]),
    )
    # seed 3 shares seed 0's split and order, not its noise
    third = out.models[2]
    np.testing.assert_array_equal(third.validation_indices, out.models[1].validation_indices)
    assert not np.allclose(
        np.asarray(third.history.to_frame()["train_loss"]),
        np.asarray(out.models[1].history.to_frame()["train_loss"]),
    )
    assert (out.history["data_seed"] == 0).all()


def test_members_save_load_and_ensemble(data, scanvi_sweep, tmp_path):
    _, adata = data
    out, _ = scanvi_sweep
    models = out.models
    models[1].save(tmp_path / "m1")
    back = js.SCANVI.load(tmp_path / "m1", adata=adata)
    np.testing.assert_allclose(
        back.get_latent_representation(),
        models[1].get_latent_representation(),
        rtol=1e-5,
        atol=1e-6,
    )
    ens = sweep.ensemble_predict(models)
    each = np.stack([m.predict(soft=True).to_numpy() for m in models])
    np.testing.assert_allclose(ens.probabilities.to_numpy(), each.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ens.probabilities.to_numpy().sum(1), 1.0, rtol=1e-6)
    top = each.mean(0).argmax(1)
    np.testing.assert_allclose(ens.disagreement, (each.argmax(2) != top).mean(0))
    assert (ens.prediction == np.asarray(models[0].registry.label_categories)[top]).all()
    h = lambda p: -(p * np.log(np.clip(p, 1e-12, 1))).sum(-1)  # noqa: E731
    np.testing.assert_allclose(
        ens.mutual_information, np.maximum(h(each.mean(0)) - h(each).mean(0), 0), atol=1e-9
    )
    cal = sweep.ensemble_calibration(models)
    assert len(cal["ece_members"]) == 3 and 0 <= cal["ece_ensemble"] <= 1
    y_idx = models[0].validation_indices
    lab = np.asarray(adata.obs["labels"])[y_idx] != "Unknown"
    assert cal["n_cells"] == lab.sum()


def test_query_members_equal_single_runs_and_keep_frozen_weights(data, scanvi_sweep):
    """A query model (scArches surgery) as the starting point: each member equals
    load_query_data(...).train(lr=...), and what surgery froze stays bitwise."""
    _, adata = data
    ref = scanvi_sweep[0].models[0]
    query = adata[:120].copy()
    query.obs["labels"] = "Unknown"
    kw = dict(max_epochs=2, plan_kwargs={"weight_decay": 0.0}, **FIT)
    start = js.SCANVI.load_query_data(query.copy(), ref)
    out = sweep.train_many(start, seeds=[0], grid={"lr": [1e-3, 3e-3]}, **kw)
    single = js.SCANVI.load_query_data(query.copy(), ref).train(
        seed=0, **{**kw, "plan_kwargs": {"weight_decay": 0.0, "lr": 3e-3}}
    )
    assert_same_model(out.models[1], single)
    mask = jax.tree_util.tree_leaves(start._freeze[0])
    before = jax.tree_util.tree_leaves(start.params)
    for model in out.models:
        after = jax.tree_util.tree_leaves(model.params)
        for m, b, a in zip(mask, before, after):
            m = np.broadcast_to(np.asarray(m, bool), np.shape(b))
            np.testing.assert_array_equal(np.asarray(a)[~m], np.asarray(b)[~m])
        assert any(not np.array_equal(a, b) for a, b in zip(after, before))


def test_library_kernels_and_sparse_device_cells(data, monkeypatch):
    """The other branches of the vmapped epoch: no deferred Adam (the library
    path, as on a GPU) and CSR counts on the device (data above the dense cap),
    each member gathering its own minibatches."""
    from functools import partial

    import jaxscanvi.sweep as sweep_module
    from jaxscanvi import backend
    from jaxscanvi.train.sources import make_source

    adata, _ = data
    monkeypatch.setattr(sweep_module, "make_source", partial(make_source, dense_max_bytes=0))
    kw = dict(max_epochs=1, **FIT)
    with backend.use("library"):
        out = sweep.train_many(
            lambda s: js.SCVI(adata, seed=s, **NET), seeds=[0, 1], order="per_model", **kw
        )
        for s, model in enumerate(out.models):
            assert_same_model(model, js.SCVI(adata, seed=s, **NET).train(seed=s, **kw))


def test_memory_refuses_too_many_members(data):
    adata, _ = data
    model = js.SCVI(adata, seed=0, **NET)

    def need(k):
        return _memory.estimate(
            model.params,
            model.state,
            n_members=k,
            batch_size=64,
            n_genes=adata.n_vars,
            data_bytes=adata.n_obs * adata.n_vars * 4,
            shared=True,
            paired=False,
        )

    with pytest.raises(InputError, match="at most 2 members") as err:
        sweep.train_many(model, seeds=[0, 1, 2, 3], max_epochs=1, memory_budget=need(2) + 1, **FIT)
    assert err.value.field == "members" and err.value.value == 4
    assert need(4) - need(2) == 2 * (need(2) - need(1))  # linear in K beyond the data


def test_memory_estimate_covers_what_xla_allocates(data):
    """The estimate is at least XLA's own count for the compiled epoch of 4 members."""
    from jaxscanvi.sweep import _members
    from jaxscanvi.sweep._loop import Member, initial_state
    from jaxscanvi.sweep._step import member_steps, vmapped_epoch
    from jaxscanvi.train.fit import check, loop_config
    from jaxscanvi.train.loop import epoch_orders
    from jaxscanvi.train.sources import make_source

    adata, _ = data
    group = []
    for s in range(4):
        m = js.SCVI(adata, seed=s, **NET)
        plan = m.fit_plan(max_epochs=1, **FIT)
        config, task = plan.config, plan.task
        _, _, tr, va = check(config, task.cells)
        group.append(Member(config, task, tr, va, s))
    source = make_source("device", group[0].task.cells, 64)
    tx, train, _ = member_steps(group[0].task, group[0].config, schedule_mode="epochs")
    ts = initial_state(group, tx, _members.hyper_arrays([g.config for g in group], has_ratio=False))
    _, rows, _ = epoch_orders(source, loop_config(group[0].config), 0, group[0].train_idx, None)
    epoch = vmapped_epoch(source, train, own_rows=False)
    carry = (ts, jnp.full((4,), -1, jnp.int32))
    stats = epoch.lower(carry, source.cells, jnp.asarray(rows), None).compile().memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    xla = stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
    est = _memory.estimate(
        group[0].task.params,
        group[0].task.state,
        n_members=4,
        batch_size=64,
        n_genes=adata.n_vars,
        data_bytes=source.device_bytes(),
        shared=True,
        paired=False,
    )
    assert xla <= est < 20 * xla, (xla, est)


def test_bad_sweeps_are_refused_before_compiling(data):
    adata, _ = data

    def make(s):
        return js.SCVI(adata, seed=s, **NET)

    cases = [
        (dict(grid={"n_hidden": [16, 32]}), "grid['n_hidden']"),
        (dict(grid={"lr": [1e-3, "fast"]}), "grid['lr']"),
        (dict(seed=3), "seed"),
        (dict(devices=2), "devices"),
        (dict(order="random"), "order"),
        (dict(order="per_model", data_seed=1), "data_seed"),
        (dict(grid={"n_epochs_kl_warmup": [None, 5]}), "grid"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InputError) as err:
            sweep.train_many(make, max_epochs=1, **{**FIT, **kwargs})
        assert err.value.field == field, kwargs


def test_fit_plan_and_a_given_fit(data):
    """The model layer's seam for sweeps: `fit_plan` says what train() would fit
    and fits nothing; `_train(plan, result)` still checks its input and adopts the
    given result; train() itself fits again."""
    from jaxscanvi.train.config import TrainConfig
    from jaxscanvi.train.fit import FitPlan, Task, fit

    adata, _ = data
    m = js.SCVI(adata, seed=0, **NET)
    init = np.asarray(m.params["z_encoder"]["mean"]["kernel"]).copy()
    plan = m.fit_plan(max_epochs=1, **FIT)
    assert isinstance(plan, FitPlan) and not m.is_trained
    assert isinstance(plan.config, TrainConfig) and isinstance(plan.task, Task)
    assert plan.config.max_epochs == 1 and plan.task.cells.n_obs == adata.n_obs
    assert plan.config.batch_size == 64 and plan.config.seed == js.settings.seed  # train's defaults
    assert np.array_equal(init, m.params["z_encoder"]["mean"]["kernel"])
    # the same names and checks as train(): an unknown keyword is refused alike
    with pytest.raises(InputError, match="not an argument of train"):
        m.fit_plan(max_epochs=1, no_such_argument=1, **FIT)

    result = fit(plan.config, plan.task)
    m._train(plan, result)
    assert m.is_trained and m.train_state is result.train_state
    assert int(m.train_state.step) > 0

    # check() inside _train refuses this (the config alone cannot): before adopting
    stream = m.fit_plan(max_epochs=1, data_source="stream", **FIT)
    with pytest.raises(InputError, match="data_source"):
        m._train(stream, result)
    before = np.asarray(m.params["z_encoder"]["mean"]["kernel"]).copy()
    m.train(max_epochs=1, **FIT)  # the real fit
    after = np.asarray(m.params["z_encoder"]["mean"]["kernel"])
    assert m.train_state is not result.train_state and not np.allclose(before, after)


def test_scanvi_fit_plan_carries_calibrate(data):
    _, adata = data
    m = js.SCANVI(adata, seed=0, **NET)
    assert m.fit_plan(max_epochs=1, **FIT).calibrate
    plan = m.fit_plan(max_epochs=1, calibrate=False, **FIT)
    assert not plan.calibrate and plan.task.labelled is not None
    assert dict(plan.config.plan.options)["classification_ratio"] == 50.0


def _both_ways(make, **kwargs):
    """The same sweep run vmapped and in turn: (vmapped, in turn) results."""
    return tuple(sweep.train_many(make, vectorize=v, **kwargs) for v in (True, False))


def test_vmapped_and_in_turn_sweeps_give_the_same_models(data):
    """vectorize=True (one vmapped program) and False (members in turn, as on the
    CPU by default) train the same models: own orders with early stopping and the
    plateau acting on some members only (as in the first test)."""
    adata, _ = data
    members = [
        {"seed": 0, "lr": 1e-3},
        {"seed": 1, "lr": 1e-4, "weight_decay": 1e-3},
        {"seed": 2, "max_kl_weight": 0.5, "n_epochs_kl_warmup": 2},
    ]
    plan = {
        "reduce_lr_on_plateau": True,
        "lr_scheduler_metric": "kl_weight",
        "lr_patience": 0,
        "lr_min": 1e-4,
    }
    vm, turn = _both_ways(
        lambda s: js.SCVI(adata, seed=s, **NET),
        members=members,
        order="per_model",
        plan_kwargs=plan,
        max_epochs=4,
        early_stopping=True,
        early_stopping_monitor="lr",
        early_stopping_patience=2,
        **FIT,
    )
    assert [m.history.n_epochs for m in vm.models] == [4, 3, 4]
    for a, b in zip(vm.models, turn.models):
        assert_same_model(a, b)
    assert not np.allclose(
        vm.models[0].history.to_frame()["train_loss"], vm.models[2].history.to_frame()["train_loss"]
    )


def test_vmapped_scanvi_sparse_library_kernels_equal_in_turn(data, monkeypatch):
    """The vmapped program's other branches against the members in turn: scANVI's
    paired labelled minibatches with a swept ratio and term weight (shared order),
    CSR counts on the device and the library kernels (no deferred Adam)."""
    from functools import partial

    import jaxscanvi.sweep as sweep_module
    from jaxscanvi import backend
    from jaxscanvi.train.sources import make_source

    _, adata = data
    members = [
        {"seed": 0, "classification_ratio": 10.0, "loss_weights.centre": 0.5},
        {"seed": 4, "classification_ratio": 50.0, "loss_weights.centre": 2.0},
    ]
    kw = dict(
        members=members,
        max_epochs=2,
        loss_terms={"centre": _centre},
        check_val_every_n_epoch=1,
        **FIT,
    )
    vm, turn = _both_ways(lambda s: js.SCANVI(adata, seed=s, **NET), **kw)
    for a, b in zip(vm.models, turn.models):
        assert_same_model(a, b)
        assert "classification_loss_validation_labelled" in a.history  # val_metrics ran
    monkeypatch.setattr(sweep_module, "make_source", partial(make_source, dense_max_bytes=0))
    with backend.use("library"):
        vm, turn = _both_ways(
            lambda s: js.SCVI(data[0], seed=s, **NET),
            seeds=[0, 1],
            order="per_model",
            max_epochs=1,
            **FIT,
        )
    for a, b in zip(vm.models, turn.models):
        assert_same_model(a, b)


def test_adamw_and_clipping_members_equal_single_runs(data):
    """The sweep's optimiser is train()'s: AdamW with gradient clipping, the decay
    swept (traced), both ways."""
    adata, _ = data
    plan = {"optimizer": "AdamW", "gradient_clip_val": 0.05}
    kw = dict(max_epochs=2, **FIT)
    vm, turn = _both_ways(
        lambda s: js.SCVI(adata, seed=s, **NET),
        seeds=[0],
        grid={"weight_decay": [0.0, 0.3]},
        plan_kwargs=plan,
        **kw,
    )
    single = js.SCVI(adata, seed=0, **NET).train(
        seed=0, plan_kwargs={**plan, "weight_decay": 0.3}, **kw
    )
    assert_same_model(vm.models[1], single)
    assert_same_model(turn.models[1], single)
    a, b = (np.asarray(m.params["z_encoder"]["mean"]["kernel"]) for m in turn.models)
    assert not np.allclose(a, b, atol=1e-4)  # the decay is a member's own


def test_vectorize_auto_picks_by_backend(data, monkeypatch):
    """'auto' runs members in turn on the CPU and vmapped elsewhere; a bad value is
    refused before anything trains."""
    import jaxscanvi.sweep as sweep_module

    adata, _ = data
    called = []
    monkeypatch.setattr(sweep_module, "run_vmapped", lambda *a, **k: called.append("vmapped") or [])
    monkeypatch.setattr(sweep_module, "run_in_turn", lambda *a, **k: called.append("in turn") or [])
    monkeypatch.setattr(sweep_module, "_finish", lambda *a: None)
    monkeypatch.setattr(sweep_module, "_result", lambda *a: None)
    make = lambda s: js.SCVI(adata, seed=s, **NET)  # noqa: E731
    sweep.train_many(make, max_epochs=1, **FIT)
    monkeypatch.setattr(sweep_module.jax, "default_backend", lambda: "gpu")
    sweep.train_many(make, max_epochs=1, **FIT)
    sweep.train_many(make, max_epochs=1, vectorize=False, **FIT)
    assert called == ["in turn", "vmapped", "in turn"]
    with pytest.raises(InputError) as err:
        sweep.train_many(make, max_epochs=1, vectorize="yes", **FIT)
    assert err.value.field == "vectorize"
