r"""Count likelihoods (NB, ZINB, Poisson) and Normal KL, stable in float32.

Everything is written in log space from the decoder's ``log_mu`` and the
dispersion's ``log_theta``, so no ``log(mu + eps)`` is needed and a mean that
underflows to 0 still has finite gradients.

For a negative binomial with mean :math:`\mu` and inverse dispersion
:math:`\theta`,

.. math::
    \log NB(x) = \underbrace{-\theta\,\mathrm{softplus}(\log\mu-\log\theta)}_{A}
      \underbrace{-\,x\,\mathrm{softplus}(\log\theta-\log\mu)}_{B}
      + \underbrace{\log\Gamma(x+\theta)-\log\Gamma(\theta)}_{D(\theta, x)}
      - \log\Gamma(x+1).

``D`` is zero when ``x = 0``. It is evaluated without lgamma (`lgamma_ratio`:
Stirling's series after shifting theta by 4), either on the non-zero entries
when they are given (``nz``, the sparse path) or on every entry, masked. The
dense float32 case runs as one fused pass (`jax.custom_vjp`) that computes
the per-entry values and their derivatives in log mu, log theta and the gate
logits together, so each entry costs 3 exp, 4 log1p, 2 log and a few
divisions in all, forward and backward; it is the faster path on the CPU
(`sparse_pays`). ``log Gamma(x+1)`` does not depend on the parameters; it is
precomputed per cell on the host and never enters the gradient.

ZINB with gate logits :math:`\pi` (probability of an extra zero
:math:`\sigma(\pi)`):

.. math::
    \log p(0) = \mathrm{softplus}(A-\pi) - \mathrm{softplus}(-\pi), \qquad
    \log p(x>0) = -\mathrm{softplus}(\pi) + \log NB(x).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

from . import backend
from .data.batch import NonZeros

# D(theta, x) is evaluated by Stirling's series at theta + _SHIFT, where it is
# accurate to 4e-9, and shifted back by the recurrence of Gamma.
_SHIFT = 4


def _stirling_tail(z):
    # lgamma(z) - [(z - 1/2) log z - z + log(2 pi)/2], asymptotic series;
    # the first omitted term, 1/(1188 z^9), is below 4e-9 for z >= 4
    zi = 1.0 / z
    zi2 = zi * zi
    return zi * (1.0 / 12.0 - zi2 * (1.0 / 360.0 - zi2 * (1.0 / 1260.0 - zi2 * (1.0 / 1680.0))))


def lgamma_ratio(theta, x):
    r"""D(theta, x) = lgamma(x + theta) - lgamma(theta), accurate for any theta > 0.

    With :math:`t = \theta + 4`, Gamma's recurrence and Stirling's series at
    t give

    .. math::
        D(\theta, x) = (t - \tfrac12)\,\mathrm{log1p}(x/t) + x(\log(t + x) - 1)
            + c(t + x) - c(t) - \log \prod_{k=0}^{3}\bigl(1 + \tfrac{x}{\theta + k}\bigr),

    with ``c`` Stirling's remainder. No term, nor its derivative in theta,
    cancels catastrophically in float32, from theta = 1e-4 to 1e8, and an
    entry costs one log1p, two logs and one division, with no lgamma or
    digamma (in the gradient): cheap
    enough for every (cell, gene) entry. Terms of theta alone are computed
    at theta's own shape (per gene when theta is per gene). The product
    stays finite in float32 for counts up to 1e7. In float64 the shift is 16.
    """
    # float64 (jax_enable_x64) shifts further, for a series error below 1e-14
    shift = 16 if jnp.result_type(theta, x) == jnp.float64 else _SHIFT
    t = theta + shift
    inv_t = 1.0 / t
    c_t = _stirling_tail(t)
    prod = 1.0
    for k in range(shift):
        prod = prod * (1.0 + x * (1.0 / (theta + k)))  # 1 / (theta + k): theta's shape
    s = (
        (t - 0.5) * jnp.log1p(x * inv_t)
        + x * (jnp.log(t + x) - 1.0)
        + (_stirling_tail(t + x) - c_t)
    )
    # exactly 0 at x = 0 (zero counts and padding entries of the sparse path)
    return jnp.where(x > 0, s - jnp.log(prod), 0.0)


def _gather(a, nz: NonZeros):
    """Value of a (G,) or (B, G) array at each non-zero entry."""
    if a.ndim == 1:
        return a[nz.col]
    return a[nz.row, nz.col]


def _row_sum(v, nz: NonZeros, n_rows: int):
    return jax.ops.segment_sum(v, nz.row, num_segments=n_rows)


def _lgamma_part(x, log_theta, nz: NonZeros | None):
    """Per-cell sum of D(theta, x)."""
    if nz is None:
        shape = jnp.broadcast_shapes(x.shape, jnp.shape(log_theta))
        return lgamma_ratio(jnp.exp(log_theta), jnp.broadcast_to(x, shape)).sum(-1)
    theta = jnp.exp(_gather(log_theta, nz))
    return _row_sum(lgamma_ratio(theta, nz.val), nz, x.shape[0])


@jax.custom_jvp
def softplus_pair(a):
    """(softplus(a), softplus(-a)) from one exp and one log1p, with exact gradients.

    Both share log1p(exp(-|a|)); neither is formed as the other minus a, which
    cancels in float32 when |a| is large.
    """
    l = jnp.log1p(jnp.exp(-jnp.abs(a)))
    return jnp.maximum(a, 0.0) + l, jnp.maximum(-a, 0.0) + l


@softplus_pair.defjvp
def _softplus_pair_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    e = jnp.exp(-jnp.abs(a))
    l = jnp.log1p(e)
    r = 1.0 / (1.0 + e)  # sigmoid(|a|); sigmoid(-|a|) = e * r
    pos = a >= 0
    sig_a = jnp.where(pos, r, e * r)
    sig_neg = jnp.where(pos, e * r, r)
    return ((jnp.maximum(a, 0.0) + l, jnp.maximum(-a, 0.0) + l), (sig_a * da, -sig_neg * da))


def nb_dense_terms(x, log_mu, log_theta):
    """A + B of the NB log-pmf, elementwise (B, G)."""
    a = log_mu - log_theta
    sp_a, sp_neg = softplus_pair(a)
    theta = jnp.exp(log_theta)
    return -theta * sp_a - x * sp_neg, -theta * sp_a


# log1p(e) / e on [0, 1]: a least-squares Chebyshev fit, in powers of e. In
# float32, e * P(e) is within 1.6e-7 of log1p(e) relative, everywhere on
# [0, 1] down to the smallest e (XLA's float32 log1p: 1.9e-7).
_LOG1P_UNIT = (
    1.0,
    -0.49999851,
    0.33329099,
    -0.24947809,
    0.19651489,
    -0.15251446,
    0.10533220,
    -0.056434970,
    0.019649142,
    -0.0032140322,
)


def log1p_unit(e):
    """log1p(e) for e in [0, 1]: a polynomial where `backend` has ``log1p_poly``
    on (ten multiply-adds; XLA's CPU log1p costs about two logs), else log1p."""
    if not backend.kernels().log1p_poly:
        return jnp.log1p(e)
    acc = _LOG1P_UNIT[-1]
    for c in _LOG1P_UNIT[-2::-1]:
        acc = acc * e + c
    return e * acc


def _softplus_sigmoid(a):
    """softplus(a), softplus(-a), sigmoid(a), sigmoid(-a) from one exp, one log1p
    and one division."""
    e = jnp.exp(-jnp.abs(a))
    l = log1p_unit(e)
    r = 1.0 / (1.0 + e)
    pos = a >= 0
    return (
        jnp.maximum(a, 0.0) + l,
        jnp.maximum(-a, 0.0) + l,
        jnp.where(pos, r, e * r),
        jnp.where(pos, e * r, r),
    )


def _stirling_tail_grad(z):
    # derivative of _stirling_tail
    zi = 1.0 / z
    zi2 = zi * zi
    return -zi2 * (1.0 / 12.0 - zi2 * (1.0 / 120.0 - zi2 * (1.0 / 252.0 - zi2 * (1.0 / 240.0))))


def _inv_sum(y):
    """sum_{k<4} 1/(y + k), in two fractions (two divisions, not four)."""
    return (2.0 * y + 1.0) / (y * (y + 1.0)) + (2.0 * y + 5.0) / ((y + 2.0) * (y + 3.0))


def _lgamma_ratio_and_grad(theta, x):
    """`lgamma_ratio` (shift 4, float32) and its derivative in theta, digamma(x +
    theta) - digamma(theta), in one pass: the derivative's terms are rational
    functions of what the value computes (XLA shares the common terms)."""
    t = theta + _SHIFT
    inv_t = 1.0 / t
    inv = sum(1.0 / (theta + k) for k in range(_SHIFT))  # theta's shape
    tx = t + x
    dd = (
        jnp.log1p(x * inv_t)
        + 0.5 * x * inv_t / tx
        + _stirling_tail_grad(tx)
        - _stirling_tail_grad(t)
        + inv
        - _inv_sum(theta + x)
    )
    return lgamma_ratio(theta, x), jnp.where(x > 0, dd, 0.0)


def _nb_entries(x, log_mu, log_theta, zi):
    """Per-entry NB (zi None) or ZINB log-pmf without -lgamma(x+1), and its
    derivatives in log_mu, log_theta and zi, from one pass over the entries."""
    theta = jnp.exp(log_theta)
    sp_a, sp_na, sig_a, sig_na = _softplus_sigmoid(log_mu - log_theta)
    big_a = -theta * sp_a
    d, dd = _lgamma_ratio_and_grad(theta, x)
    nb = big_a - x * sp_na + d
    g_mu = x * sig_na - theta * sig_a
    g_th = big_a + theta * (sig_a + dd) - x * sig_na
    if zi is None:
        return nb, g_mu, g_th, None
    sp_p, _, sig_p, _ = _softplus_sigmoid(zi)
    sp_z, _, sig_z, sig_nz = _softplus_sigmoid(big_a - zi)
    zero = x <= 0
    ll = jnp.where(zero, sp_z - sp_p + zi, nb - sp_p)
    g_mu = jnp.where(zero, -sig_z * theta * sig_a, g_mu)
    g_th = jnp.where(zero, sig_z * (big_a + theta * sig_a), g_th)
    g_zi = jnp.where(zero, sig_nz, 0.0) - sig_p
    return ll, g_mu, g_th, g_zi


def _unbroadcast(g, shape):
    """Sum a cotangent down to the shape its input had before broadcasting."""
    g = g.sum(tuple(range(g.ndim - len(shape)))) if g.ndim > len(shape) else g
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axes, keepdims=True) if axes else g


@jax.custom_vjp
def _fused_ll(x, log_mu, log_theta, zi):
    return _nb_entries(x, log_mu, log_theta, zi)[0].sum(-1)


def _fused_fwd(x, log_mu, log_theta, zi):
    ll, g_mu, g_th, g_zi = _nb_entries(x, log_mu, log_theta, zi)
    szi = None if zi is None else jnp.shape(zi)
    return ll.sum(-1), (g_mu, g_th, g_zi, x, log_mu, log_theta, szi)


def _count_grad(x, log_mu, log_theta, *, zero_inflated: bool):
    """d/dx of the log-pmf, as autodiff gives it for the generic code:
    digamma(x + theta) - log(1 + theta/mu) at x > 0; at x = 0, where D is
    pinned to 0, -log(1 + theta/mu) for NB and 0 for ZINB (whose zero case
    holds no x). Traced only when a caller differentiates with respect to
    the counts; otherwise XLA drops it."""
    theta = jnp.exp(log_theta)
    _, sp_na, _, _ = _softplus_sigmoid(log_mu - log_theta)
    y = theta + x
    z = y + _SHIFT
    digamma = jnp.log(z) - 0.5 / z + _stirling_tail_grad(z) - _inv_sum(y)
    return jnp.where(x > 0, digamma - sp_na, 0.0 if zero_inflated else -sp_na)


def _fused_bwd(res, ct):
    g_mu, g_th, g_zi, x, log_mu, log_theta, szi = res
    c = ct[..., None]
    return (
        _unbroadcast(
            c * _count_grad(x, log_mu, log_theta, zero_inflated=g_zi is not None), jnp.shape(x)
        ),
        _unbroadcast(c * g_mu, jnp.shape(log_mu)),
        _unbroadcast(c * g_th, jnp.shape(log_theta)),
        None if g_zi is None else _unbroadcast(c * g_zi, szi),
    )


_fused_ll.defvjp(_fused_fwd, _fused_bwd)


def sparse_pays() -> bool:
    """Whether the likelihood should use the list of non-zeros when it has one.

    On the CPU the fused dense pass is faster (measured: 22,000 vs 15,000
    cells/s for scVI at batch 128), since gathers and scatter-adds there are
    slower than the four logs an entry costs. Elsewhere `backend` decides
    (the ``sparse_likelihood`` switch).
    """
    return backend.kernels().sparse_likelihood


def _use_fused(nz, *arrays) -> bool:
    # dense float32 entries: the fused pass (float64 keeps autodiff's exactness)
    return (
        nz is None
        and backend.kernels().fused_likelihood
        and all(jnp.result_type(a) == jnp.float32 for a in arrays)
    )


def log_nb(x, log_mu, log_theta, *, nz: NonZeros | None = None, lgamma_const=None):
    """Per-cell NB log-likelihood, summed over genes. x: (B, G)."""
    if _use_fused(nz, x, log_mu, log_theta):
        return _fused_ll(x, log_mu, log_theta, None) - _const(x, lgamma_const)
    ab, _ = nb_dense_terms(x, log_mu, log_theta)
    out = ab.sum(-1) + _lgamma_part(x, log_theta, nz)
    return out - _const(x, lgamma_const)


def log_zinb(x, log_mu, log_theta, zi_logits, *, nz: NonZeros | None = None, lgamma_const=None):
    """Per-cell ZINB log-likelihood, summed over genes. x: (B, G)."""
    if _use_fused(nz, x, log_mu, log_theta, zi_logits):
        return _fused_ll(x, log_mu, log_theta, zi_logits) - _const(x, lgamma_const)
    ab, a_term = nb_dense_terms(x, log_mu, log_theta)
    sp_pi = jax.nn.softplus(zi_logits)
    # softplus(-pi) = softplus(pi) - pi
    case_zero = jax.nn.softplus(a_term - zi_logits) - sp_pi + zi_logits
    case_nonzero = ab - sp_pi
    dense = jnp.where(x > 0, case_nonzero, case_zero).sum(-1)
    return dense + _lgamma_part(x, log_theta, nz) - _const(x, lgamma_const)


def log_poisson(x, log_mu, *, lgamma_const=None):
    """Per-cell Poisson log-likelihood, summed over genes."""
    return (x * log_mu - jnp.exp(log_mu)).sum(-1) - _const(x, lgamma_const)


def _const(x, lgamma_const):
    # sum_g lgamma(x + 1): data only, kept out of the gradient.
    if lgamma_const is None:
        # float32 gammaln(1) is 4.8e-7, not 0: skip the zeros
        lgamma_const = jnp.where(x > 0, gammaln(x + 1.0), 0.0).sum(-1)
    return jax.lax.stop_gradient(lgamma_const)


def normal_log_prob(x, mean, var):
    """Elementwise log N(x; mean, var)."""
    return -0.5 * (jnp.log(2.0 * jnp.pi) + jnp.log(var) + (x - mean) ** 2 / var)


def kl_normal(m1, v1, m2, v2):
    """Elementwise KL(N(m1, v1) || N(m2, v2)) with variances v."""
    return 0.5 * (jnp.log(v2) - jnp.log(v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


def kl_standard_normal(m, v):
    """Elementwise KL(N(m, v) || N(0, 1))."""
    return 0.5 * (v + m * m - 1.0 - jnp.log(v))
