"""The jitted kernels of inference: ``fn(module, variables, batch, key, ...)``.

Each runs the module on one chunk of cells and returns arrays with the cell
axis first; `_inference.jitted` compiles them and `_inference.map_cells`
maps them over the cells. The ELBO's own per-cell kernels are in `losses`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..distributions import log_nb, log_poisson, log_zinb, normal_log_prob
from ..module import SCANVAE


def encode_fn(module, variables, batch, key):
    """q(z|x) of each cell (moments and one draw) and, for scANVI, q(c|z)'s
    logits at the posterior mean: the one program of a model (and chunk size)
    behind get_latent_representation, predict, calibration and DE's q(z|x),
    instead of one per call site. The classifier is small next to the encoder."""

    def run(mdl, b):
        inf = mdl.inference(b, train=False)
        out = {"z": inf["z"], "qz_m": inf["qz_m"], "qz_v": inf["qz_v"]}
        if isinstance(mdl, SCANVAE):
            out["logits"] = mdl.classifier(inf["qz_m"], train=False, mask=b.weight)
        return out

    return module.apply(variables, batch, rngs={"sample": key}, method=run)


def latent_fn(module, variables, batch, key, *, give_mean: bool, mc_samples: int):
    inf = module.apply(
        variables, batch, train=False, rngs={"sample": key}, method=type(module).inference
    )
    if give_mean:
        if module.config.latent_distribution == "ln":
            eps = jax.random.normal(key, (mc_samples, *inf["qz_m"].shape))
            z = jax.nn.softmax(inf["qz_m"] + jnp.sqrt(inf["qz_v"]) * eps, -1).mean(0)
        else:
            z = inf["qz_m"]
    else:
        z = inf["z"]
    return {"z": z, "qz_m": inf["qz_m"], "qz_v": inf["qz_v"]}


def expression_fn(
    module, variables, batch, key, batch_code, *, n_samples: int, latent_library: bool
):
    def run(mdl, b):
        inf = mdl.inference(b, train=False, n_samples=n_samples)
        bidx = None if batch_code is None else jnp.full_like(b.batch, batch_code)
        gen = mdl.generative(inf["z"], inf["library"], b, train=False, batch_index=bidx)
        out = jnp.exp(gen["log_mu"] if latent_library else gen["log_scale"])
        return jnp.swapaxes(out, 0, 1) if out.ndim == 3 else out

    return module.apply(variables, batch, rngs={"sample": key}, method=run)


def classify_fn(module, variables, batch, key, *, use_posterior_mean):
    return module.apply(
        variables,
        batch,
        train=False,
        rngs={"sample": key},
        use_posterior_mean=use_posterior_mean,
        method=SCANVAE.classify,
    )


def label_expression_fn(
    module, variables, batch, key, batch_code, *, target: int, n_samples: int, latent_library: bool
):
    def run(mdl, b):
        inf = mdl.inference(b, train=False, n_samples=n_samples)
        z1 = inf["z"]
        C = mdl.config.n_labels
        qz_m, _ = mdl.encode_z(b, train=False)
        pred = jnp.argmax(mdl.classifier(qz_m, train=False, mask=b.weight), -1)
        src = jnp.where(b.labels < C, b.labels, pred)
        flat = z1.reshape(-1, z1.shape[-1])
        reps = flat.shape[0] // src.shape[0]
        w = jnp.tile(b.weight, reps)
        m2, v2 = mdl.encoder_z2_z1(flat, (jnp.tile(src, reps),), train=False, mask=w)
        u = m2 + jnp.sqrt(v2) * jax.random.normal(mdl.make_rng("sample"), m2.shape)
        z1t, _ = mdl.decoder_z1_z2(
            u, (jnp.full(src.shape[0] * reps, target, jnp.int32),), train=False, mask=w
        )
        z1t = z1t.reshape(z1.shape)
        bidx = None if batch_code is None else jnp.full_like(b.batch, batch_code)
        gen = mdl.generative(z1t, inf["library"], b, train=False, batch_index=bidx)
        out = jnp.exp(gen["log_mu"] if latent_library else gen["log_scale"])
        return jnp.swapaxes(out, 0, 1) if out.ndim == 3 else out

    return module.apply(variables, batch, rngs={"sample": key}, method=run)


def _generate(mdl, b, n_samples, batch_code=None):
    inf = mdl.inference(b, train=False, n_samples=n_samples)
    bidx = None if batch_code is None else jnp.full_like(b.batch, batch_code)
    gen = mdl.generative(inf["z"], inf["library"], b, train=False, batch_index=bidx)
    return inf, gen


def _theta(gen, shape) -> jax.Array | None:
    lt = gen["log_theta"]
    return None if lt is None else jnp.broadcast_to(jnp.exp(lt), shape)


def _dispersion(gen, shape) -> jax.Array:
    """`_theta` of a negative-binomial likelihood (nb, zinb), which always has one."""
    theta = _theta(gen, shape)
    assert theta is not None
    return theta


def predictive_fn(module, variables, batch, key, batch_code, *, n_samples: int):
    import numpyro.distributions as dist

    def run(mdl, b):
        _, gen = _generate(mdl, b, n_samples, batch_code)
        mu = jnp.exp(gen["log_mu"])
        lik = mdl.config.gene_likelihood
        if lik == "poisson":
            d = dist.Poisson(mu)
        elif lik == "nb":
            d = dist.NegativeBinomial2(mean=mu, concentration=_dispersion(gen, mu.shape))
        else:
            d = dist.ZeroInflatedNegativeBinomial2(
                mean=mu, concentration=_dispersion(gen, mu.shape), gate_logits=gen["zi_logits"]
            )
        x = d.sample(mdl.make_rng("sample"))
        return jnp.moveaxis(x, 0, -1) if n_samples > 1 else x  # (B, G[, S])

    return module.apply(variables, batch, rngs={"sample": key}, method=run)


def likelihood_fn(module, variables, batch, key, *, n_samples: int):
    def run(mdl, b):
        _, gen = _generate(mdl, b, n_samples)
        mu = jnp.exp(gen["log_mu"])
        out = {"mean": mu}
        if mdl.config.gene_likelihood != "poisson":
            out["dispersions"] = _dispersion(gen, mu.shape)
        if mdl.config.gene_likelihood == "zinb":
            out["dropout"] = jax.nn.sigmoid(gen["zi_logits"])
        # the chunk mapper concatenates along axis 0: put cells first
        return {k: jnp.swapaxes(v, 0, 1) if n_samples > 1 else v for k, v in out.items()}

    return module.apply(variables, batch, rngs={"sample": key}, method=run)


def library_fn(module, variables, batch, key, *, give_mean: bool):
    def run(mdl, b):
        inf = mdl.inference(b, train=False)
        if "ql_m" in inf and give_mean:
            return jnp.exp(inf["ql_m"] + 0.5 * inf["ql_v"])
        return jnp.exp(inf["library"])

    return module.apply(variables, batch, rngs={"sample": key}, method=run)


def denoised_fn(module, variables, batch, key, batch_code, size_factor, *, n_samples: int):
    def run(mdl, b):
        _, gen = _generate(mdl, b, n_samples, batch_code)
        rate = size_factor * jnp.exp(gen["log_scale"])
        theta = _theta(gen, rate.shape)
        if theta is None:
            x = rate
        else:
            g = jax.random.gamma(mdl.make_rng("sample"), theta)
            x = g * rate / theta
        return jnp.moveaxis(x, 0, 1) if n_samples > 1 else x[:, None]  # (B, S, G)

    return module.apply(variables, batch, rngs={"sample": key}, method=run)


def sample_fn(module, variables, batch, key, batch_code):
    """One posterior sample per cell: z (pre-transform), scale and likelihood params."""

    def run(mdl, b):
        inf, gen = _generate(mdl, b, 1, batch_code)
        out = {
            "z": inf["untran_z"],
            "log_scale": gen["log_scale"],
            "scale": jnp.exp(gen["log_scale"]),
        }
        if gen["log_theta"] is not None:
            out["log_theta"] = jnp.broadcast_to(gen["log_theta"], gen["log_scale"].shape)
        if gen["zi_logits"] is not None:
            out["zi_logits"] = gen["zi_logits"]
        return out

    return module.apply(variables, batch, rngs={"sample": key}, method=run)


def anchor_terms(likelihood, z, log_scale, log_theta, zi, qm, qv, xa, lib, log_px):  # noqa: PLR0913 (a jitted kernel's arrays)
    """Per sample: logsumexp_a [log p(z) + log p(x_a|z) - log p(x_a)] - logsumexp_a log q(z|x_a)."""
    log_pz = normal_log_prob(z, 0.0, 1.0).sum(-1)  # (S,)
    log_qz = normal_log_prob(z[:, None, :], qm[None], qv[None]).sum(-1)  # (S, A)
    log_mu = log_scale[:, None, :] + lib[None, :, None]  # (S, A, G)
    x = xa[None]
    if likelihood == "poisson":
        ll = log_poisson(x, log_mu)
    elif likelihood == "nb":
        ll = log_nb(x, log_mu, log_theta[:, None, :])
    else:
        ll = log_zinb(x, log_mu, log_theta[:, None, :], zi[:, None, :])
    a = log_pz[:, None] + ll - log_px[None, :]
    return jax.nn.logsumexp(a, 1) - jax.nn.logsumexp(log_qz, 1)
