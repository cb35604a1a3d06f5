"""Training objectives: what one step's data cost a network.

An objective has two steps, so that the training loop needs to know nothing of it:

- ``draw(batch, generator, parts=1)``: the randomness of the step (noise, times, pairing, label
  dropout, extra rows), outside autocast and in a fixed order, for the whole global batch;
  ``Drawn.part(i, parts)`` is the ``i``-th of ``parts`` equal shares, one per process and micro-batch,
  so that a step's draws do not depend on how many processes share it;
- ``loss(model, drawn)``: the scalar loss of the network on those draws (run under autocast).

:class:`CFM` is conditional flow matching; the few-step generators :class:`MeanFlow` and
:class:`Shortcut` plug in beside it through :data:`OBJECTIVES` and :func:`make_objective`. For a
loop of your own, :meth:`CFM.sample` draws one batch's training example (``x_t``, ``t``, target).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import torch

from .couplings import IndependentCoupling
from .data import Batch
from .models.cond import null_condition
from .paths import AffinePath, LinearPath, PathSample, expand, posterior_mean
from .timesteps import LogitNormalTime, UniformTime


def stable_target(path: AffinePath, x0, x1, t, reference, label=None, reference_label=None) -> torch.Tensor:
    """The stable target field (Xu et al. 2023): the conditional velocity ``u_t`` averaged over
    the posterior of the data point given ``x_t``, on a reference set of data, the batch's own
    ``x1`` first and then ``reference``. ``x_t ~ N(alpha x1_j, sigma^2 I)`` given ``x1_j``, so
    the weights are a softmax of ``-||x_t - alpha x1_j||^2 / (2 sigma^2)``; the target is
    ``sum_j w_j u_j`` with ``u_j = alpha' x1_j + sigma' (x_t - alpha x1_j) / sigma``. On a finite
    data set taken whole as the reference it is the marginal field (:func:`~flowmatch.paths.marginal_velocity`);
    on a sample, a lower-variance estimate of it than ``u_t`` (which is the one-point reference).

    Written as ``alpha' m + sigma' (x0 + alpha (x1 - m) / sigma)`` with ``m = sum_j w_j x1_j``: near
    the data (``sigma -> 0``) the weight falls on the row's own ``x1``, ``m = x1`` exactly and the
    target is ``u_t`` with no division of rounding errors by ``sigma``. With labels (the null label
    of classifier-free guidance aside), a row averages over its own class only.
    """
    a, s, da, ds = (expand(v, x0) for v in path.schedule(t))
    x_t = a * x1 + s * x0
    ref_label = None if label is None else torch.cat([label, reference_label])
    with torch.no_grad():
        m = posterior_mean(path, x_t, t, torch.cat([x1, reference]), label, ref_label)
        return da * m + ds * (x0 + a * (x1 - m) / s.clamp_min(torch.finfo(s.dtype).tiny))  # sigma = 0: m = x1


#: the losses a prediction can be compared with its target by
LOSSES = ("mse", "pseudo-huber", "lpips-huber")


@dataclass
class Loss:
    """How a prediction is compared with its target.

    ``"mse"``: ``E || v - u ||^2`` (mean over all entries).

    ``"pseudo-huber"``: ``E [sqrt(||v - u||^2 + c^2) - c]`` per sample (Song & Dhariwal 2023; RF++,
    Lee et al. 2024), with ``c = huber_c`` or ``0.00054 sqrt(D)``. Its minimiser is a (geometric)
    median, not the mean: meant for fixed pairs (distillation), where the target is a function of
    the noise and a network too smooth to follow it should pick a side rather than land between two cells.

    ``"lpips-huber"`` (RF++'s LPIPS-Huber, as its reference code writes it, in this package's time):
    ``E [t * H(v, u) / D + d(x_t + (1 - t) v, x1)]``, the pseudo-Huber ``H`` with ``c = huber_c`` or
    ``0.00054 D``, weighted by ``t`` (zero at the noise), plus ``perceptual``, a distance ``d``
    (:class:`~flowmatch.perceptual.Perceptual`) between the data the prediction implies on the
    straight path and the data."""

    name: str = "mse"
    huber_c: float | None = None
    perceptual: object = None

    def __post_init__(self):
        if self.name not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.name!r}")
        if (self.name == "lpips-huber") != (self.perceptual is not None):
            raise ValueError("a perceptual distance goes with the lpips-huber loss, and only with it")

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, ps: PathSample) -> torch.Tensor:
        if self.name == "mse":
            return torch.nn.functional.mse_loss(pred.float(), target.float())
        d2 = (pred.float() - target.float()).flatten(1).pow(2).sum(1)
        dim = ps.x1[0].numel()
        if self.name == "lpips-huber":
            c = self.huber_c if self.huber_c is not None else 0.00054 * dim
            t = ps.t.float()
            implied = ps.x_t.float() + expand(1 - t, ps.x_t) * pred.float()
            return (t * ((d2 + c**2).sqrt() - c) / dim + self.perceptual(implied, ps.x1.float())).mean()
        c = self.huber_c if self.huber_c is not None else 0.00054 * d2.new_tensor(dim).sqrt()
        return ((d2 + c**2).sqrt() - c).mean()


def cfm_loss(model, path: AffinePath, x0, x1, t, label=None, loss: Loss | None = None, target=None) -> torch.Tensor:
    """Conditional flow matching: ``E || v(x_t, t) - u_t ||^2`` (or another :class:`Loss`);
    ``target`` replaces ``u_t`` where given (:func:`stable_target`)."""
    ps = path.sample(x0, x1, t)
    pred = model(ps.x_t, t, label) if label is not None else model(ps.x_t, t)
    return (loss or Loss())(pred, ps.u_t if target is None else target, ps)


@dataclass
class Drawn:
    """One step's draws: noise ``x0`` paired with data ``x1``, times ``t``, labels (``-1`` =
    dropped, for classifier-free guidance) or ``None``."""

    x0: torch.Tensor
    x1: torch.Tensor
    t: torch.Tensor
    label: torch.Tensor | None
    t_end: torch.Tensor | None = None  # MeanFlow: the end of each pair's interval [t, t_end]
    reference: Batch | None = None  # CFM with a stable target: extra data draws (and their labels)
    own: tuple | None = None  # MeanFlow --meanflow-distill: rows (z, t, h, label, target) from the network's own trajectories

    def part(self, i: int, parts: int) -> Drawn:
        """The ``i``-th of ``parts`` equal shares of the rows (a process's micro-batch). Its stable
        target's reference holds the other shares' data before the extra draws, so that every row
        averages over the whole batch, as in one share."""
        if parts == 1:
            return self
        n = len(self.x1)
        if n % parts:
            raise ValueError(f"a batch of {n} rows does not split into {parts} equal parts")
        b = n // parts
        rows = slice(i * b, (i + 1) * b)
        cut = lambda a: None if a is None else a[rows]  # noqa: E731
        reference = self.reference
        if reference is not None:
            others = lambda a, extra: torch.cat([a[:i * b], a[(i + 1) * b:], extra])  # noqa: E731
            reference = Batch(others(self.x1, reference.x1),
                              label=None if self.label is None else others(self.label, reference.label))
        own = None
        if self.own is not None:
            k = len(self.own[0]) // parts
            own = tuple(None if a is None else a[i * k:(i + 1) * k] for a in self.own)
        return Drawn(cut(self.x0), cut(self.x1), cut(self.t), cut(self.label), cut(self.t_end), reference, own)


class CFM:
    """Conditional flow matching: noise ``x0 ~ N(0, I)`` (or a batch's fixed ``x0``: teacher
    pairs), times from ``time_sampler``, pairs from ``coupling``, the path's velocity as target
    (by default the article's: the straight path, uniform times, independent noise); with
    ``stf > 0`` and ``reference`` (a data set's ``sample(n, generator)``), the stable target
    (:func:`stable_target`) over the batch and ``stf`` more draws of the data."""

    name = "cfm"
    #: whether the network takes the step's interval ``h`` and samples in a few steps (:func:`~flowmatch.solvers.flow_map`)
    interval = False

    def __init__(self, path: AffinePath | None = None, time_sampler=None, coupling=None, label_dropout: float = 0.0,
                 loss: Loss | None = None, stf: int = 0, reference=None):
        self.path = path if path is not None else LinearPath()
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        self.coupling = coupling if coupling is not None else IndependentCoupling()
        self.label_dropout, self.loss_fn = label_dropout, loss or Loss()
        if stf and reference is None:
            raise ValueError("stf needs reference, a function (n, generator) -> Batch that draws more data")
        self.stf, self.reference = stf, reference

    def draw(self, batch: Batch, generator: torch.Generator | None = None, parts: int = 1) -> Drawn:
        """The step's draws for ``batch`` (the whole global batch): noise, times, pairing, dropped
        labels, the stable target's extra points, in that order from ``generator`` (None: torch's
        global generator). ``parts``: how many equal shares the step will be split into."""
        x1 = batch.x1
        x0 = batch.x0 if batch.x0 is not None else torch.randn(x1.shape, generator=generator, device=x1.device)
        t = self.time_sampler.sample(len(x1), generator, device=x1.device)
        x0, x1, label = self.coupling.pair(x0, x1, generator, batch.label)
        label = self.drop_labels(label, generator)
        reference = self.reference(self.stf, generator) if self.stf else None
        return Drawn(x0, x1, t, label, reference=reference)

    def drop_labels(self, label: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Labels (condition vectors) replaced by the null condition with probability ``label_dropout``: the
        rows that teach the unconditional field."""
        if label is None or self.label_dropout <= 0:
            return label
        drop = torch.rand(len(label), generator=generator, device=label.device) < self.label_dropout
        return torch.where(expand(drop, label), null_condition(label), label)

    def sample(self, x1: torch.Tensor, x0: torch.Tensor | None = None, generator: torch.Generator | None = None,
               label: torch.Tensor | None = None) -> PathSample:
        """One training example for a loop of your own, as torchcfm's
        ``sample_location_and_conditional_flow``: noise (unless given), times, pairing and the path
        on the batch ``x1`` (B, ...): ``x_t``, ``t`` and the target ``u_t`` (the stable target with
        ``stf``), with the pairs ``x0, x1`` as paired. ``loss = ((model(s.x_t, s.t) - s.u_t) ** 2).mean()``."""
        d = self.draw(Batch(x1, x0=x0, label=label), generator)
        ps = self.path.sample(d.x0, d.x1, d.t)
        return ps if d.reference is None else replace(ps, u_t=self._stable(d))

    def refresh(self, teacher, step: int, steps: int, dataset, seed: int, device="cpu") -> None:
        """Called by the trainer before each step with its EMA network; objectives that learn from
        the network's own samples (MeanFlow's ``--meanflow-distill``) update them here."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the objective (MeanFlow: its own trajectories)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def _stable(self, d: Drawn) -> torch.Tensor:
        return stable_target(self.path, d.x0, d.x1, d.t, d.reference.x1.to(d.x1.dtype), d.label, d.reference.label)

    def loss(self, model, d: Drawn) -> torch.Tensor:
        target = None if d.reference is None else self._stable(d)
        return cfm_loss(model, self.path, d.x0, d.x1, d.t, d.label, self.loss_fn, target)


@dataclass
class MeanFlowOptions:
    """MeanFlow's settings. The defaults are the measured recipe for vectors (``flowmatch train
    --objective meanflow`` on 2-D toys and tables; images train with ``share=0.5, distill=0``):
    an adaptive loss weight of power 0.5, a quarter of the pairs on intervals, half a batch more
    of rows from the network's own trajectories after half the steps."""

    share: float = 0.25  # share of pairs with t_end > t (the rest: flow matching)
    power: float = 0.5  # adaptive weight 1 / (err + c)^power (the paper's 1; 0: plain MSE)
    c: float = 1e-3
    tangent: str = "conditional"  # the JVP's direction in z: conditional (x1 - x0) or model (u(z, t, 0))
    fm_time: str = "single"  # the flow-matching pairs' time: single (one draw) or paired (the earlier of two)
    to_data: float = 0.0  # share of the interval pairs that end at the data (t_end = 1)
    distill: float = 0.5  # rows from the network's own trajectories, a share of the batch (0: none)
    distill_whole: float = 0.5  # share of those on the whole step 0 -> 1
    distill_start: float = 0.5  # share of the steps after which they start
    distill_every: int = 250  # steps between refreshes of the trajectories
    distill_pairs: int = 4096  # trajectories per refresh
    distill_nfe: int = 16  # midpoint evaluations per trajectory (even)

    def __post_init__(self):
        for name, ok, expected in (("tangent", self.tangent in ("conditional", "model"), "conditional or model"),
                                   ("fm_time", self.fm_time in ("single", "paired"), "single or paired"),
                                   ("distill_nfe", self.distill_nfe >= 2 and self.distill_nfe % 2 == 0, "an even number >= 2")):
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, cfg) -> MeanFlowOptions:
        """The options a :class:`~flowmatch.config.TrainConfig` sets (its ``meanflow_*`` settings)."""
        return cls(**{f.name: getattr(cfg, f"meanflow_{f.name}") for f in fields(cls) if hasattr(cfg, f"meanflow_{f.name}")})


class MeanFlow(CFM):
    """MeanFlow (Geng et al. 2025): the network ``u(z, t, h)`` predicts the *average* velocity
    over ``[t, t + h]``, ``u = 1/h * integral of v(z_s, s) ds``, so that one step ``z1 = z0 +
    u(z0, 0, 1)`` generates. Written in this package's time (noise at 0, data at 1), the identity
    ``(t_end - t) u(z_t, t, t_end) = integral_t^t_end v`` differentiated in ``t`` gives the target

        u = v + (t_end - t) d/dt u(z_t, t, t_end),   d/dt = v . grad_z + d/dt (t_end fixed),

    a Jacobian-vector product along ``(v, 1, 0)`` (``torch.func.jvp``), under stop-gradient,
    with ``v = x1 - x0`` the straight path's conditional velocity. Times: a share ``share`` of the
    pairs takes two draws of the time sampler, sorted, as ``[t, t_end]``; the rest are plain flow
    matching (``t_end = t``) at one draw (``fm_time="single"``, as CFM draws its times) or at the
    earlier of the two draws (``"paired"``, the paper's code: more weight near the noise). A share
    ``to_data`` of the intervals ends at the data instead, ``[t, 1]``: the derivative holds
    ``t_end``, so these form a family of their own under the identity, the one the one step
    ``u(z0, 0, 1)`` belongs to. The
    loss is adaptively weighted, ``w = 1 / (||u - target||^2 + c)^p`` (stop-gradient), ``c =
    1e-3``, ``p = 1`` in the paper (TrainConfig's default: 0.5).

    ``tangent="model"`` (improved MeanFlow, Geng et al. 2025b) takes the JVP along the network's
    own instantaneous velocity ``u(z_t, t, 0)`` (no gradient) instead of ``x1 - x0``: the target
    keeps its conditional ``v`` (unbiased), and its derivative term follows the field instead of
    one draw of ``x1 - x0``. At the exact field both targets have the same mean; given ``z_t``
    their spreads differ by the factor ``I + h du/dz``, so the model tangent varies less where the
    flow spreads out and more where it contracts (``tests/test_meanflow.py``)."""

    name = "meanflow"
    interval = True

    def __init__(self, time_sampler=None, coupling=None, options: MeanFlowOptions | None = None,
                 label_dropout: float = 0.0, stf: int = 0, reference=None):
        from .couplings import OTCoupling

        super().__init__(LinearPath(), time_sampler if time_sampler is not None else LogitNormalTime(0.4, 1.0),
                         coupling if coupling is not None else OTCoupling(), label_dropout, stf=stf, reference=reference)
        self.options = options or MeanFlowOptions()
        self.trajectories = None  # (K + 1, N, ...) grid points of the network's own trajectories, and their labels
        self.teacher = None  # a flow-matching network v(z, t[, label]) whose trajectories replace the network's own

    def draw(self, batch: Batch, generator: torch.Generator | None = None, parts: int = 1) -> Drawn:
        o, d = self.options, super().draw(batch, generator)
        t2 = self.time_sampler.sample(len(d.t), generator, device=d.t.device)
        t, t_end = torch.minimum(d.t, t2), torch.maximum(d.t, t2)
        keep = torch.rand(len(t), generator=generator, device=t.device) < o.share
        if o.fm_time == "single":  # the flow-matching pairs at one draw of the sampler, as CFM draws them
            t = torch.where(keep, t, d.t)
        if o.to_data > 0:  # a share of the intervals end at the data: [t, 1], the one step's family
            end = torch.rand(len(t), generator=generator, device=t.device) < o.to_data
            t_end = torch.where(end, torch.ones_like(t_end), t_end)
        own = None
        if self.trajectories is not None:  # the same number of own rows in every part
            own = self.own_rows(parts * max(1, round(o.distill * len(t) / parts)), generator)
        return Drawn(d.x0, d.x1, t, d.label, torch.where(keep, t_end, t), d.reference, own)

    @torch.no_grad()
    def refresh(self, teacher, step: int, steps: int, dataset, seed: int, device="cpu") -> None:
        """``--meanflow-distill``: from ``distill_start`` of the ``steps`` on, every ``distill_every``
        steps, integrate ``distill_pairs`` noise draws along ``teacher``'s instantaneous field ``u(z,
        t, 0)`` (the trainer's EMA) by ``distill_nfe / 2`` midpoint steps, keeping every grid point.
        The average velocity over ``[t_i, t_j]`` is by definition ``(z_j - z_i) / (t_j - t_i)`` along
        the flow, so these trajectories give exact targets for the network's own flow, without the
        spread of one draw of ``x1 - x0`` that the MeanFlow identity's target carries. With a
        :attr:`teacher` (``init``: a trained flow-matching network), its field instead, from the first
        step. The draws
        come from the refresh's own stream (``seed``, its step): every process refreshes alike."""
        from .seeding import generator
        from .solvers import integrate

        o = self.options
        start = 0 if self.teacher is not None else int(o.distill_start * steps)  # a teacher's field is good at once
        due = self.trajectories is None or (step - start) % o.distill_every == 0  # none yet: at once
        if o.distill <= 0 or step < start or not due:
            return
        gen = generator(seed, "refresh", step, device=device)
        conditioned = dataset.num_classes or dataset.cond_dim  # the teacher follows labels (conditions) drawn with the data
        # labels dropped as in the batches: the null-label trajectories teach the unconditional map
        label = self.drop_labels(dataset.sample(o.distill_pairs, gen).label, gen) if conditioned else None
        x0 = torch.randn(o.distill_pairs, *dataset.shape, generator=gen, device=device)
        zeros = torch.zeros(o.distill_pairs, device=device, dtype=x0.dtype)
        if self.teacher is not None:  # ``init``: the flow-matching run's own field
            field = self.teacher.to(device)
            teacher_v = lambda z, t: field(z, t, label).to(z.dtype)  # noqa: E731
        else:
            teacher_v = lambda z, t: teacher(z, t, label, h=zeros).to(z.dtype)  # noqa: E731
        path = integrate(teacher_v, x0, "midpoint", o.distill_nfe, trajectory=True).trajectory
        self.trajectories = (path, label)

    def state_dict(self) -> dict:
        if self.trajectories is None:
            return {}
        path, label = self.trajectories
        return {"trajectories": path.cpu(), **({} if label is None else {"trajectory_labels": label.cpu()})}

    def load_state_dict(self, state: dict) -> None:
        if "trajectories" in state:
            label = state.get("trajectory_labels")
            self.trajectories = (state["trajectories"], label)

    def own_rows(self, n: int, gen: torch.Generator | None = None) -> tuple:
        """``n`` rows drawn from the stored trajectories: a share ``distill_whole`` of
        them the whole step ``[0, 1]``, the others two distinct grid points ``i < j``; input ``z_i`` at ``t_i``, interval
        ``h = t_j - t_i``, target ``(z_j - z_i) / h``."""
        path, label = self.trajectories
        k, dev = len(path) - 1, path.device
        row = torch.randint(path.shape[1], (n,), generator=gen, device=dev)
        i = torch.randint(k + 1, (n,), generator=gen, device=dev)
        j = (i + torch.randint(1, k + 1, (n,), generator=gen, device=dev)) % (k + 1)  # another grid point
        i, j = torch.minimum(i, j), torch.maximum(i, j)
        whole = torch.rand(n, generator=gen, device=dev) < self.options.distill_whole
        i, j = torch.where(whole, 0, i), torch.where(whole, k, j)
        t, h = i.to(path.dtype) / k, (j - i).to(path.dtype) / k
        z = path[i, row]
        target = (path[j, row] - z) / expand(h, z)
        return z, t, h, None if label is None else label[row], target

    def target(self, model, d: Drawn) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's average velocity on the draws, and its MeanFlow target (no gradient).

        The JVP is taken on the interval rows only: on the flow-matching rows (``t_end = t``) its
        term is multiplied by ``t_end - t = 0``, so their target is ``v`` and they need one plain
        forward pass (at the default share of 0.5, half the JVP's cost; the loss is the same)."""
        ps = self.path.sample(d.x0, d.x1, d.t)  # the straight path: z_t and v = x1 - x0
        z, v = ps.x_t, ps.u_t
        if d.reference is not None:  # --stf: v (in the target and as the tangent) averaged over the posterior
            v = self._stable(d)
        t, t_end, label = d.t, d.t_end, d.label
        jvp = t_end > t  # the interval rows: only they need the derivative
        if d.own is not None:  # --meanflow-distill: rows with a fixed target, through the plain pass
            z_own, t_own, h_own, label_own, target_own = d.own
            z, v = torch.cat([z, z_own.to(z.dtype)]), torch.cat([v, target_own.to(v.dtype)])
            t, t_end = torch.cat([t, t_own.to(t.dtype)]), torch.cat([t_end, (t_own + h_own).to(t.dtype)])
            label = None if label is None else torch.cat([label, label_own])
            jvp = torch.cat([jvp, torch.zeros_like(t_own, dtype=torch.bool)])
        h = t_end - t
        rows = jvp.nonzero().flatten()
        if len(rows) == len(h):
            rows = None  # all of them: no gather
        sub = (lambda a: a) if rows is None else (lambda a: None if a is None else a[rows])

        bare = _bare(model)
        zi, ti, ei, li = sub(z), sub(t), sub(t_end), sub(label)

        def u(z, t, t_end):
            return bare(z, t, li, h=t_end - t)

        if len(ti) == 0:  # no interval rows: flow matching alone
            return model(z, t, label, h=h), v.detach()
        direction = sub(v)
        if self.options.tangent == "model":  # the network's marginal velocity instead of one draw of x1 - x0
            with torch.no_grad():
                direction = bare(zi, ti, li, h=torch.zeros_like(ti)).to(v.dtype)
        tangents = (direction, torch.ones_like(ti), torch.zeros_like(ti))
        if bare is model and rows is None:  # one pass: the JVP's primal output is the prediction, with its graph
            with _jvp_kernels(bare, z.device):
                pred, du_dt = torch.func.jvp(u, (zi, ti, ei), tangents)
        else:
            if bare is model:  # the interval rows' JVP with its graph, the others by a plain pass
                with _jvp_kernels(bare, z.device):
                    pred_i, jv = torch.func.jvp(u, (zi, ti, ei), tangents)
                rest = (~jvp).nonzero().flatten()
                pred_f = model(z[rest], t[rest], None if label is None else label[rest], h=h[rest])
                pred = torch.cat([pred_i, pred_f])[torch.cat([rows, rest]).argsort()]  # back in the batch's order
            else:
                # A wrapper (DDP, torch.compile) cannot run inside a functorch transform (DDP's
                # forward mutates its buckets): the JVP on the bare module, without a graph (the
                # target is stop-gradient), and the prediction through the wrapper, so that DDP
                # all-reduces its gradients.
                with torch.no_grad(), _jvp_kernels(bare, z.device):
                    _, jv = torch.func.jvp(u, (zi, ti, ei), tangents)
                pred = model(z, t, label, h=h)
            jv = jv.detach().to(v.dtype)
            du_dt = jv if rows is None else torch.zeros_like(v).index_copy(0, rows, jv)  # 0 on the flow-matching rows
        return pred, (v + expand(h, v) * du_dt.to(v.dtype)).detach()

    def loss(self, model, d: Drawn) -> torch.Tensor:
        pred, target = self.target(model, d)
        err = (pred.float() - target.float()).flatten(1).pow(2).sum(1)
        return (err / (err.detach() + self.options.c) ** self.options.power).mean()


class Shortcut(CFM):
    """Shortcut models (Frans et al. 2024): the network ``u(z, t, h)`` takes the step size ``h``
    and predicts the step ``z + h u`` that lands where the flow does, so one network samples in
    1, 2, 4, ... steps. A share ``1 - share`` of each batch is flow matching (``h = 0``, target
    ``x1 - x0``); the rest (the first rows) are self-consistency pairs: a step ``2d`` from ``t``
    on its own grid (``t`` a multiple of ``2d``, ``2d`` in ``1, 1/2, ..., 2/N``) must equal two
    steps ``d`` of the network itself, under stop-gradient,

        target = (u(z_t, t, d) + u(z_t + d u(z_t, t, d), t + d, d)) / 2,

    with the finest steps ``d = 1/N`` taken by the instantaneous velocity ``u(., ., 0)``, which
    flow matching trains: the chain rests on it. Both hold for the exact average velocity."""

    name = "shortcut"
    interval = True

    def __init__(self, time_sampler=None, coupling=None, share: float = 0.25, steps: int = 128, label_dropout: float = 0.0):
        super().__init__(LinearPath(), time_sampler, coupling, label_dropout)
        if not (steps >= 2 and steps & (steps - 1) == 0):
            raise ValueError(f"steps must be a power of 2 >= 2, got {steps}")
        self.share, self.steps = share, steps

    def draw(self, batch: Batch, generator: torch.Generator | None = None, parts: int = 1) -> Drawn:
        d = super().draw(batch, generator)
        n_boot = round(self.share * len(d.t))
        levels = self.steps.bit_length() - 1  # full steps 2^-k, k = 0 .. levels - 1
        k = torch.randint(0, levels, (n_boot,), generator=generator, device=d.t.device)
        full = torch.exp2(-k.to(d.t.dtype))
        start = torch.floor(torch.rand(n_boot, generator=generator, device=d.t.device) / full) * full  # on the step's grid
        t = torch.cat([start, d.t[n_boot:]])
        return Drawn(d.x0, d.x1, t, d.label, torch.cat([start + full, d.t[n_boot:]]))

    def target(self, model, d: Drawn) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's steps on the draws, and their targets (no gradient)."""
        ps = self.path.sample(d.x0, d.x1, d.t)
        z, h = ps.x_t, d.t_end - d.t
        target, boot = ps.u_t.clone(), h > 0
        if boot.any():
            bare = _bare(model)  # no gradient: DDP's wrapper is not needed
            zb, tb, half = z[boot], d.t[boot], h[boot] / 2
            lb = None if d.label is None else d.label[boot]
            hq = torch.where(half * self.steps < 1.5, torch.zeros_like(half), half)  # the finest: flow matching's
            with torch.no_grad():
                u1 = bare(zb, tb, lb, h=hq)
                u2 = bare(zb + expand(half, u1) * u1, tb + half, lb, h=hq)
            target[boot] = ((u1 + u2) / 2).to(target.dtype)  # under autocast the network answers in bf16
        return model(z, d.t, d.label, h=h), target

    def loss(self, model, d: Drawn) -> torch.Tensor:
        pred, target = self.target(model, d)
        return torch.nn.functional.mse_loss(pred.float(), target.float())


def _jvp_kernels(model, device: torch.device) -> contextlib.ExitStack:
    """What the JVP of ``model`` needs: attention (the UNet's middle block) by the math kernel, since
    the fused kernels have no forward-mode derivative; and, on the CPU, no bf16 autocast unless the
    network is convolution-free (CPU autocast casts a convolution's input but not its tangent, and
    the convolution refuses the mixed pair), so the UNet's JVP runs in fp32 there and the MLP's in
    bf16 (``python benchmarks/precision_step.py --objective meanflow``: 1.4x the step at batch 2048)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    modules = model.modules() if isinstance(model, torch.nn.Module) else None  # a plain function: no modules to see
    if device.type == "cpu" and (modules is None or any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in modules)):
        stack.enter_context(torch.autocast("cpu", enabled=False))
    return stack


def _bare(model):
    """The module under DDP's and torch.compile's wrappers (a plain function: itself)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


#: the objectives by name (``--objective``)
OBJECTIVES = {"cfm": CFM, "meanflow": MeanFlow, "shortcut": Shortcut}


def objective_class(name: str) -> type[CFM]:
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]


def make_objective(cfg, parts) -> CFM:
    """The objective of a :class:`~flowmatch.config.TrainConfig` and its built parts."""
    reference = parts.dataset.sample if cfg.stf else None
    if cfg.objective == "meanflow":
        objective = MeanFlow(parts.time_sampler, parts.coupling, MeanFlowOptions.from_config(cfg), cfg.label_dropout,
                             cfg.stf, reference)
        objective.teacher = parts.teacher
        return objective
    if cfg.objective == "shortcut":
        return Shortcut(parts.time_sampler, parts.coupling, cfg.shortcut_share, cfg.shortcut_steps, cfg.label_dropout)
    perceptual = None
    if cfg.loss == "lpips-huber":
        from .perceptual import Perceptual

        perceptual = Perceptual(cfg.perceptual)
    return CFM(parts.path, parts.time_sampler, parts.coupling, cfg.label_dropout, Loss(cfg.loss, cfg.huber_c, perceptual),
               cfg.stf, reference)
