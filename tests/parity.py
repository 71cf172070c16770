"""Parity with scvi-tools: train small scvi-tools models, import their weights,
and compare every quantity in evaluation mode.

Both sides are evaluated at the posterior means (scvi-tools' ``rsample`` is
patched to return the mean; jaxscanvi's terms take ``sample=False``), so the
comparison is deterministic. A quantity's difference is

    max |ours - theirs| / max |theirs|     (over all cells and genes)

The posterior summaries (``get_elbo``, ``get_reconstruction_error``,
``get_marginal_ll``) are compared through both libraries' public methods,
once with every posterior sample replaced by its mean on both sides (ours:
`jaxscanvi.nn.prng.normal` returns zeros), which makes them deterministic and
exactly comparable, and once with real sampling (`stochastic`), as a paired
z-test per cell. `training_curves` trains both from the same initial weights.

Run ``python tests/parity.py [--json PATH]`` (needs scvi-tools and torch) to
print the README's parity table; ``tests/test_parity.py`` asserts it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import jax
import numpy as np

TOL = 1e-5
# |mean paired difference| / its standard error, for the sampled estimates
Z_MAX = 4.0
# per-epoch ELBO of a training run from the same initial weights
CURVE_TOL = 0.01

# scvi-tools settings compared (SCVI keyword arguments); "scanvi" is SCANVI
# from "scvi_default", "scvi_query" and "scanvi_query" are scvi-tools'
# load_query_data surgery models of "scvi_default" and "scanvi"
CASES = {
    "scvi_default": dict(n_latent=5, n_hidden=32),
    "scvi_nb_learned_library": dict(
        n_latent=4,
        n_hidden=24,
        n_layers=2,
        gene_likelihood="nb",
        dispersion="gene-batch",
        use_observed_lib_size=False,
        encode_covariates=True,
    ),
    "scvi_poisson_layernorm": dict(
        n_latent=4,
        n_hidden=16,
        gene_likelihood="poisson",
        use_batch_norm="none",
        use_layer_norm="both",
    ),
}


SCANVI_CASES = ("scanvi", "scanvi_query")
DERIVED = {"scanvi": "scvi_default", "scvi_query": "scvi_default", "scanvi_query": "scanvi"}


def parity_adata(seed: int = 0, n_cells: int = 400):
    """400 cells x 120 genes, 2 batches, a categorical and a continuous covariate,
    4 cell types of which 30% of cells are unlabelled."""
    from jaxscanvi import synthetic_atlas

    a = synthetic_atlas(
        n_cells=n_cells, n_genes=120, n_batches=2, n_lineages=2, types_per_lineage=2, seed=seed
    )
    rng = np.random.default_rng(seed)
    a.obs["site"] = rng.choice(["s1", "s2", "s3"], a.n_obs)
    a.obs["percent_mito"] = rng.normal(0.0, 1.0, a.n_obs)
    lab = a.obs["cell_type"].astype(str).to_numpy().copy()
    lab[rng.random(a.n_obs) < 0.3] = "Unknown"
    a.obs["label"] = lab
    return a


def _quiet():
    import logging

    import torch

    # one thread: torch's pool thrashes on a small shared CPU (several times slower)
    torch.set_num_threads(1)
    for name in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def query_adata():
    """Cells of two batches the reference never saw (same genes and columns)."""
    q = parity_adata(seed=1, n_cells=200)
    q.obs["batch"] = ("query_" + q.obs["batch"].astype(str)).astype("category")
    return q


def train_scvi_tools(folder: Path, epochs: int = 3) -> dict[str, Path]:
    """Train one scvi-tools model per case, scANVI on the first, and a query
    model of each of those two (scArches surgery); save each."""
    import scvi

    _quiet()
    scvi.settings.seed = 0
    out = {}
    for name, kw in CASES.items():
        a = parity_adata()
        scvi.model.SCVI.setup_anndata(
            a,
            batch_key="batch",
            labels_key="label",
            categorical_covariate_keys=["site"],
            continuous_covariate_keys=["percent_mito"],
        )
        m = scvi.model.SCVI(a, **kw)
        m.train(max_epochs=epochs, batch_size=128, enable_progress_bar=False)
        m.save(folder / name, save_anndata=True, overwrite=True)
        out[name] = folder / name
        if name == "scvi_default":
            s = scvi.model.SCANVI.from_scvi_model(m, unlabeled_category="Unknown")
            s.train(max_epochs=epochs, batch_size=128, enable_progress_bar=False)
            s.save(folder / "scanvi", save_anndata=True, overwrite=True)
            out["scanvi"] = folder / "scanvi"
            for qname, cls, ref in (
                ("scvi_query", scvi.model.SCVI, m),
                ("scanvi_query", scvi.model.SCANVI, s),
            ):
                q = cls.load_query_data(query_adata(), ref)
                q.train(
                    max_epochs=epochs,
                    batch_size=128,
                    enable_progress_bar=False,
                    plan_kwargs={"weight_decay": 0.0},
                )
                q.save(folder / qname, save_anndata=True, overwrite=True)
                out[qname] = folder / qname
    return out


@contextlib.contextmanager
def _means_not_samples():
    """scvi-tools samples with Normal.rsample; return the mean instead."""
    import torch

    orig = torch.distributions.Normal.rsample

    def mean(self, sample_shape=torch.Size()):  # noqa: B008 - torch's own signature
        return self.loc.expand(self._extended_shape(sample_shape))

    torch.distributions.Normal.rsample = mean
    try:
        yield
    finally:
        torch.distributions.Normal.rsample = orig


def _theirs(model, scanvi: bool) -> dict[str, np.ndarray]:
    import torch

    module = model.module
    module.eval()
    dl = model._make_data_loader(adata=model.adata, batch_size=model.adata.n_obs)
    tensors = next(iter(dl))
    with torch.no_grad(), _means_not_samples():
        inf, gen, loss = module(tensors, loss_kwargs={"kl_weight": 1.0})
    px = gen["px"]
    rec = loss.reconstruction_loss
    rec = sum(v for v in rec.values()) if isinstance(rec, dict) else rec
    kl = loss.kl_local
    out = {
        "latent_mean": inf["qz"].loc,
        "latent_var": inf["qz"].scale ** 2,
        "px_scale": px.scale,
        "px_rate": px.mu if hasattr(px, "mu") else px.rate,
        "reconstruction_loss": rec,
        "kl_local": sum(kl.values()),
    }
    if getattr(px, "theta", None) is not None:
        out["px_theta"] = px.theta
    if getattr(px, "zi_logits", None) is not None:
        out["px_dropout_logits"] = px.zi_logits
    if not scanvi:
        out["kl_z"] = kl["kl_divergence_z"]
        if inf.get("ql") is not None:
            out["kl_l"] = kl["kl_divergence_l"]
    else:
        with torch.no_grad():
            out["classifier_logits"] = module.classify(
                tensors["X"],
                tensors["batch"],
                cont_covs=tensors.get("extra_continuous_covs"),
                cat_covs=tensors.get("extra_categorical_covs"),
            )
    out["elbo_per_cell"] = out["reconstruction_loss"] + out["kl_local"]
    out["reconstruction_loss_sparse"] = out["reconstruction_loss"]
    n = tensors["X"].shape[0]
    return {
        k: np.broadcast_to(
            v.detach().numpy(), (n, *tuple(v.shape[1:])) if v.ndim > 1 else v.shape
        ).astype(np.float64)
        for k, v in out.items()
    }


def _ours(model, scanvi: bool, want) -> dict[str, np.ndarray]:
    from jaxscanvi import losses

    batch = model.minibatch()
    key = jax.random.PRNGKey(0)
    if scanvi:
        t, o, _ = losses.scanvi_per_cell(
            model.module,
            model.params,
            model.state,
            batch,
            key,
            objective="scvi-tools",
            sparse=False,
            sample=False,
        )
    else:
        t, o, _ = losses.scvi_per_cell(
            model.module, model.params, model.state, batch, key, sparse=False, sample=False
        )
    # the likelihood over the list of non-zeros (the training path on
    # accelerators; the CPU trains on the fused dense pass above) must agree too
    fn = losses.scanvi_per_cell if scanvi else losses.scvi_per_cell
    kw = {"objective": "scvi-tools"} if scanvi else {}
    with mock.patch("jaxscanvi.losses.common.sparse_pays", lambda: True):
        t_sparse = fn(
            model.module, model.params, model.state, batch, key, sparse=True, sample=False, **kw
        )[0]
    out = {
        "latent_mean": o["qz_m"],
        "latent_var": o["qz_v"],
        "reconstruction_loss_sparse": t_sparse["reconstruction_loss"],
        "px_scale": np.exp(o["log_scale"]),
        "px_rate": np.exp(o["log_mu"]),
        "reconstruction_loss": t["reconstruction_loss"],
        "kl_local": t["kl_local"],
        "elbo_per_cell": t["elbo"],
        "kl_z": t["kl_z"],
        "kl_l": t["kl_l"],
    }
    if o.get("log_theta") is not None:
        out["px_theta"] = np.exp(np.asarray(o["log_theta"]))
    if o.get("zi_logits") is not None:
        out["px_dropout_logits"] = o["zi_logits"]
    if scanvi:
        out["classifier_logits"] = model.module.apply(
            {"params": model.params, **model.state},
            batch,
            train=False,
            method=type(model.module).classify,
        )
    return {
        k: np.broadcast_to(np.asarray(out[k], np.float64), want[k].shape) for k in want if k in out
    }


def rel_diff(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def load_pair(folder: Path, name: str):
    """(scvi-tools' model loaded by scvi-tools, the same folder imported by us)."""
    import scvi

    import jaxscanvi as js

    _quiet()
    scanvi = name in SCANVI_CASES
    theirs_model = (scvi.model.SCANVI if scanvi else scvi.model.SCVI).load(str(folder))
    ours_model = (js.SCANVI if scanvi else js.SCVI).from_scvi_tools(folder)
    return theirs_model, ours_model


def compare(folder: Path, name: str, pair=None) -> dict:
    """Import one scvi-tools folder and measure every quantity's difference."""
    scanvi = name in SCANVI_CASES
    theirs_model, ours_model = pair or load_pair(folder, name)
    theirs = _theirs(theirs_model, scanvi)
    ours = _ours(ours_model, scanvi, theirs)
    diffs = {k: rel_diff(ours[k], theirs[k]) for k in theirs}
    result = {
        "case": name,
        "kwargs": CASES.get(name, {"from": DERIVED.get(name)}),
        "max_rel_diff": diffs,
    }
    if scanvi:
        pt = np.asarray(theirs_model.predict()).astype(str)
        pj = np.asarray(ours_model.predict()).astype(str)
        result["predict_agreement"] = float((pt == pj).mean())
        soft_t = np.asarray(theirs_model.predict(soft=True))
        soft_j = np.asarray(ours_model.predict(soft=True))
        result["max_rel_diff"]["predict_soft"] = rel_diff(soft_j, soft_t)
    result["max_rel_diff"]["get_latent_representation"] = rel_diff(
        ours_model.get_latent_representation(), theirs_model.get_latent_representation()
    )
    return result


@contextlib.contextmanager
def _ours_at_means():
    """jaxscanvi samples through `nn.prng.normal`; return zeros (the means).
    Compiled functions are dropped before and after, so none traced with the
    patch outlives it."""
    import jax.numpy as jnp

    from jaxscanvi import clear_caches

    clear_caches()
    with mock.patch(
        "jaxscanvi.nn.prng.normal", lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype)
    ):
        try:
            yield
        finally:
            clear_caches()


def _posterior(model, n_mc_samples: int) -> dict[str, np.ndarray]:
    """get_elbo, get_reconstruction_error, get_marginal_ll: per cell and mean."""

    def arr(v):
        return np.asarray(v.detach().numpy() if hasattr(v, "detach") else v, np.float64)

    return {
        "get_elbo_per_cell": arr(model.get_elbo(return_mean=False)),
        "get_elbo": arr(model.get_elbo()),
        "get_reconstruction_error_per_cell": arr(
            model.get_reconstruction_error(return_mean=False)["reconstruction_loss"]
        ),
        "get_reconstruction_error": arr(model.get_reconstruction_error()["reconstruction_loss"]),
        "get_marginal_ll_per_cell": arr(
            model.get_marginal_ll(n_mc_samples=n_mc_samples, return_mean=False)
        ),
        "get_marginal_ll": arr(model.get_marginal_ll(n_mc_samples=n_mc_samples)),
    }


def _z(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Mean paired difference over its standard error: both sides draw
    independent samples of the same per-cell estimator, so without a bias
    this is about N(0, 1)."""
    d = ours - theirs
    return float(d.mean() / max(d.std(ddof=1) / np.sqrt(len(d)), 1e-12))


def compare_posterior(folder: Path, name: str, n_mc_samples: int = 50, pair=None) -> dict:
    """get_elbo / get_reconstruction_error / get_marginal_ll of one imported
    folder against scvi-tools' own methods on it.

    ``max_rel_diff``: every posterior sample (z, l, and scANVI's u) at its
    mean on both sides, so each method is deterministic; the marginal
    likelihood's samples are then all equal and it reduces to the log weight at
    the means, which checks every term of the weight and scvi-tools'
    averaging (400 cells: minibatches 128, 128, 128, 16; a query's 200: 128, 72). ``z``: sampled as
    usual, ``n_mc_samples`` importance samples, the paired z statistic of the
    per-cell estimates (ELBO: one sample each).
    """
    import torch

    theirs_model, ours_model = pair or load_pair(folder, name)
    with _means_not_samples():
        theirs = _posterior(theirs_model, 2)
    with _ours_at_means():
        ours = _posterior(ours_model, 2)
    torch.manual_seed(0)
    t_ll = theirs_model.get_marginal_ll(n_mc_samples=n_mc_samples, return_mean=False).numpy()
    t_elbo = theirs_model.get_elbo(return_mean=False).numpy()
    o_ll = ours_model.get_marginal_ll(n_mc_samples=n_mc_samples, return_mean=False)
    o_elbo = ours_model.get_elbo(return_mean=False)
    return {
        "case": name,
        "n_cells": int(theirs_model.adata.n_obs),
        "max_rel_diff": {k: rel_diff(ours[k], theirs[k]) for k in theirs},
        "z": {
            "get_marginal_ll": _z(o_ll.astype(np.float64), t_ll.astype(np.float64)),
            "get_elbo": _z(o_elbo.astype(np.float64), t_elbo.astype(np.float64)),
        },
        "means": {
            "get_marginal_ll": [float(o_ll.mean()), float(t_ll.mean())],
            "get_elbo": [float(o_elbo.mean()), float(t_elbo.mean())],
        },
    }


def training_curves(folder: Path, epochs: int = 5, *, scanvi: bool = False) -> dict:
    """Train scvi-tools and jaxscanvi from the same initial weights (an untrained
    scvi-tools model, saved and imported) on the same cells with the same
    settings; return both per-epoch ``elbo_train`` curves.

    The minibatch order, dropout masks and posterior samples differ (torch's
    generator against ours), so the curves agree in distribution, not bit
    for bit. scANVI trains with ``objective="scvi-tools"``, scvi-tools' loss.
    """
    import scvi

    import jaxscanvi as js

    _quiet()
    scvi.settings.seed = 0
    a = parity_adata(seed=2, n_cells=1000)
    cls = scvi.model.SCANVI if scanvi else scvi.model.SCVI
    if scanvi:
        cls.setup_anndata(a, labels_key="label", unlabeled_category="Unknown", batch_key="batch")
    else:
        cls.setup_anndata(a, batch_key="batch")
    m = cls(a, n_latent=5, n_hidden=32)
    init = folder / ("init_scanvi" if scanvi else "init_scvi")
    m.save(init, save_anndata=True, overwrite=True)
    ours = (js.SCANVI if scanvi else js.SCVI).from_scvi_tools(init)
    kw = dict(max_epochs=epochs, batch_size=128, train_size=1.0)
    m.train(enable_progress_bar=False, **kw)
    plan = {"objective": "scvi-tools"} if scanvi else {}
    ours.train(progress_bar=False, plan_kwargs=plan, **kw)
    theirs_curve = np.asarray(m.history["elbo_train"]["elbo_train"], np.float64)
    ours_curve = np.asarray(ours.history["elbo_train"]["elbo_train"], np.float64)  # same form
    rel = np.abs(ours_curve - theirs_curve) / np.abs(theirs_curve)
    return {
        "model": "SCANVI" if scanvi else "SCVI",
        "epochs": epochs,
        "elbo_train_scvi_tools": theirs_curve.tolist(),
        "elbo_train_jaxscanvi": ours_curve.tolist(),
        "max_rel_diff": float(rel.max()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        folders = train_scvi_tools(Path(d), args.epochs)
        results, posterior = [], []
        for n, f in folders.items():
            pair = load_pair(f, n)
            results.append(compare(f, n, pair))
            posterior.append(compare_posterior(f, n, pair=pair))
        curves = [training_curves(Path(d), scanvi=sc) for sc in (False, True)]
    import scvi
    import torch

    record = {
        "scvi_tools": scvi.__version__,
        "torch": torch.__version__,
        "epochs": args.epochs,
        "tolerance": TOL,
        "results": results,
        "posterior": posterior,
        "z_max": Z_MAX,
        "training_curves": curves,
        "curve_tolerance": CURVE_TOL,
    }
    for r, q in zip(results, posterior):
        print(f"{r['case']}:")
        for k, v in {**r["max_rel_diff"], **q["max_rel_diff"]}.items():
            print(f"  {k:34s} {v:.2e}")
        if "predict_agreement" in r:
            print(f"  {'predict() labels equal':34s} {r['predict_agreement']:.4f}")
        for k, v in q["z"].items():
            print(f"  {k + ' sampled, paired z':34s} {v:+.2f}")
    for c in curves:
        print(f"{c['model']} elbo_train per epoch, max rel diff {c['max_rel_diff']:.2e}")
        print("  scvi-tools", " ".join(f"{v:.2f}" for v in c["elbo_train_scvi_tools"]))
        print("  jaxscanvi ", " ".join(f"{v:.2f}" for v in c["elbo_train_jaxscanvi"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
