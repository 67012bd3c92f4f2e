"""model_wrapper against closed forms: every model type on every kind of time input,
and every guidance type, using the Gaussian mixture's exact denoiser as the network."""
import pytest
import torch

from ats.models import model_wrapper
from ats.models.wrapper import expand_dims
from ats.noise import EDMSchedule, NoiseScheduleVP, RectifiedFlowSchedule

SCHEDULES = {
    "discrete": NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000)),
    "linear": NoiseScheduleVP("linear"),
    "edm": EDMSchedule(),
    "flow": RectifiedFlowSchedule(3.0),
}


def exact(gmm, ns, x, t):
    alpha, sigma = (expand_dims(v, x.ndim) for v in (ns.marginal_alpha(t), ns.marginal_std(t)))
    x0 = gmm(x / alpha, sigma.flatten() / alpha.flatten())
    return x0, (x - alpha * x0) / sigma, alpha, sigma


def convert(model_type, eps, x0, alpha, sigma):
    return {"noise": eps, "x_start": x0, "v": alpha * eps - sigma * x0, "score": -eps / sigma, "edm": x0,
            "flow": eps - x0}[model_type]


def network(gmm, ns, model_type):
    """A network predicting ``model_type`` from the time input model_wrapper must give it.
    With a condition c (a per-sample tensor) its noise prediction is eps + 0.1 c; the
    keyword ``gain`` (per sample) scales that shift, so model_kwargs that get lost show."""
    discrete = getattr(ns, "schedule", "") == "discrete"

    def net(x_in, t_input, cond=None, gain=None):
        if model_type == "edm":
            t = ns.inverse_edm_sigma(t_input)
            x = x_in * expand_dims(ns.marginal_alpha(t), x_in.ndim)
        elif isinstance(ns, RectifiedFlowSchedule):   # diffusers' timestep: the flow sigma * 1000
            t, x = ns.inverse_model_sigma(t_input / 1000.), x_in
        else:
            t = t_input / 1000. + 1. / ns.total_N if discrete else t_input
            x = x_in
        _, eps, alpha, sigma = exact(gmm, ns, x, t)
        if cond is not None:
            eps = eps + 0.1 * cond[:, None] * (1. if gain is None else gain[:, None])
        return convert(model_type, eps, (x - sigma * eps) / alpha, alpha, sigma)
    return net


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("model_type", ["noise", "x_start", "v", "score", "edm", "flow"])
@pytest.mark.parametrize("guidance_type", ["uncond", "classifier", "classifier-free"])
def test_every_model_type_with_every_guidance(gmm, schedule, model_type, guidance_type):
    ns = SCHEDULES[schedule]
    b = 6
    x = torch.randn(b, gmm.dim, dtype=torch.float64)
    t = (torch.tensor([0.9, 0.5, 0.2, 0.05, 0.01, 0.002], dtype=torch.float64) * ns.T).clamp(min=ns.eps)
    eps = exact(gmm, ns, x, t)[1]
    sigma = ns.marginal_std(t)[:, None]
    labels = torch.arange(1., b + 1., dtype=torch.float64)
    gain = torch.linspace(0.5, 2., b, dtype=torch.float64)
    mu = torch.randn(b, gmm.dim, dtype=torch.float64)
    if guidance_type == "uncond":
        kwargs, expected = {}, eps
    elif guidance_type == "classifier":
        kwargs = dict(condition=labels, guidance_scale=2.,
                      classifier_fn=lambda z, t_in, y: -0.5 * (y[:, None] * (z - mu) ** 2).sum(-1))
        expected = eps + 2. * sigma * labels[:, None] * (x - mu)
    else:
        kwargs = dict(condition=labels, unconditional_condition=torch.zeros(b, dtype=torch.float64),
                      guidance_scale=3., model_kwargs={"gain": gain})
        expected = eps + 3. * 0.1 * labels[:, None] * gain[:, None]
    model_fn = model_wrapper(network(gmm, ns, model_type), ns, model_type=model_type,
                             guidance_type=guidance_type, **kwargs)
    torch.testing.assert_close(model_fn(x, t), expected)
    # A scalar time equals the same time given per sample.
    torch.testing.assert_close(model_fn(x, t[2]), model_fn(x, t[2].expand(b)))


def test_discrete_time_input_is_training_step():
    seen = []
    ns = SCHEDULES["discrete"]
    model_fn = model_wrapper(lambda x, t_in: seen.append(t_in) or torch.zeros_like(x), ns)
    model_fn(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([1e-3, 1.], dtype=torch.float64))
    torch.testing.assert_close(seen[0], torch.tensor([0., 999.], dtype=torch.float64))


def test_classifier_guidance(gmm):
    ns = SCHEDULES["linear"]
    mu = torch.randn(3, gmm.dim, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1])

    def classifier_fn(x, t_input, y, temperature=1.):
        return -0.5 * ((x - mu[y]) ** 2).sum(-1) * (1 + t_input) / temperature

    x = torch.randn(4, gmm.dim, dtype=torch.float64)
    t = torch.tensor([0.8, 0.4, 0.1, 0.02], dtype=torch.float64)
    model_fn = model_wrapper(network(gmm, ns, "noise"), ns, guidance_type="classifier", guidance_scale=2.5,
                             condition=labels, classifier_fn=classifier_fn, classifier_kwargs={"temperature": 2.})
    grad = -(x - mu[labels]) * (1 + t)[:, None] / 2.
    expected = exact(gmm, ns, x, t)[1] - 2.5 * ns.marginal_std(t)[:, None] * grad
    torch.testing.assert_close(model_fn(x, t), expected)
    # Differentiable in x through the guidance gradient.
    xr = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: model_fn(z, t), (xr,))


def conditional_net(gmm, ns, calls):
    base = network(gmm, ns, "noise")

    def net(x, t_input, cond, scale=None, shift=0.):
        calls.append((x.shape[0], None if scale is None else scale.shape[0]))
        out = base(x, t_input) + cond[:, None] * 0.1
        return out * (1. if scale is None else scale[:, None]) + shift
    return net


def test_classifier_free_guidance_with_model_kwargs_and_cond_process(gmm):
    ns = SCHEDULES["discrete"]
    calls = []
    net = conditional_net(gmm, ns, calls)
    x = torch.randn(3, gmm.dim, dtype=torch.float64)
    t = torch.tensor([0.7, 0.3, 0.05], dtype=torch.float64)
    labels, null = torch.tensor([1., 2., 3.], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    kwargs = {"scale": torch.tensor([1., 2., 0.5], dtype=torch.float64), "shift": 0.25}
    model_fn = model_wrapper(net, ns, guidance_type="classifier-free", guidance_scale=3., condition=labels,
                             unconditional_condition=null, model_kwargs=kwargs, cond_process_fn=lambda c: c * 2)
    out = model_fn(x, t)
    assert calls == [(6, 6)]  # one batched call, per-sample kwargs repeated
    t_in = (t - 1e-3) * 1000
    eps_c, eps_u = net(x, t_in, labels * 2, **kwargs), net(x, t_in, null * 2, **kwargs)
    torch.testing.assert_close(out, eps_u + 3. * (eps_c - eps_u))
    # guidance_scale 1 is the conditional model alone, in one unbatched call.
    calls.clear()
    plain = model_wrapper(net, ns, guidance_type="classifier-free", condition=labels, model_kwargs=kwargs)
    torch.testing.assert_close(plain(x, t), net(x, t_in, labels, **kwargs))
    assert calls[0] == (3, 3)


def test_dict_conditions_are_batched(gmm):
    ns = SCHEDULES["linear"]

    def net(x, t_input, cond):
        return cond["a"][:, None] + cond["b"][:, None] * x

    cond = {"a": torch.ones(2, dtype=torch.float64), "b": torch.full((2,), 2., dtype=torch.float64)}
    null = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    x = torch.randn(2, 3, dtype=torch.float64)
    out = model_wrapper(net, ns, guidance_type="classifier-free", guidance_scale=2., condition=cond,
                        unconditional_condition=null)(x, 0.5)
    torch.testing.assert_close(out, 2. * (1. + 2. * x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(model_type="eps"), "unknown model_type 'eps'"),
    (dict(guidance_type="cfg"), "unknown guidance_type 'cfg'"),
    (dict(guidance_type="classifier", condition=torch.zeros(1)), "needs classifier_fn"),
    (dict(guidance_type="classifier-free"), "needs condition"),
    (dict(guidance_type="classifier-free", condition=torch.zeros(1), guidance_scale=2.), "needs unconditional"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        model_wrapper(lambda x, t: x, SCHEDULES["linear"], **kwargs)


def test_wrong_number_of_times():
    model_fn = model_wrapper(lambda x, t: x, SCHEDULES["linear"])
    with pytest.raises(ValueError, match="t has 3 entries for a batch of 2"):
        model_fn(torch.zeros(2, 4), torch.ones(3) * 0.5)
