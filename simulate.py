"""The paper's theory and simulations, runnable on a laptop CPU.

Draganov et al., "On the Importance of Embedding Norms in Self-Supervised Learning", ICML 2025, arXiv:2502.09252. Its
Sections 3-4 and Appendices A-D show that the gradient of the cosine similarity is orthogonal to the embedding and
scaled by 1/||z||, so large embeddings learn slowly and gradient descent only ever grows norms. Each subcommand (see
--help) turns one claim into a table, a CSV and a JSON file in --out, and a PNG when matplotlib is installed.

    python simulate.py all                      # every table, in order
    python simulate.py norms --seed 1 --out runs/simulate
    python simulate.py gradients --quick        # the reduced sizes the tests use

Measured on a 2-core Intel Xeon shared with other jobs, before `landscape` and the figures were added: `all` ran in
89-94 s, steps-to-converge grew like norm^2.002 over norms 0.25..10 (theory: 2), and `landscape` alone took about 2 s.
The tables are in docs/measurements.md.
"""
import csv
import json
import math
import os
import time

import torch
from torch import nn

import safety
from gradscale import gradscale

THRESHOLD = 1e-3  # "converged" once the mean cosine similarity exceeds 1 - 1e-3 (App. B.1)


# ----------------------------------------------------------------------------- helpers
def unit(z):
    return z / z.norm(dim=-1, keepdim=True)


def cos(a, b):
    return (unit(a) * unit(b)).sum(-1)


def sin_angle(a, b):
    """sin of the angle between rows as |u-v| |u+v| / 2: accurate near 0 and pi, and independent of Prop. 3.1."""
    u, v = unit(a), unit(b)
    return (u - v).norm(dim=-1) * (u + v).norm(dim=-1) / 2


def cos_grad(zi, zj):
    """Prop. 3.1 in closed form: d cos(zi, zj) / d zi = (unit(zj) projected off zi) / ||zi||."""
    ui, uj = unit(zi), unit(zj)
    return (uj - (ui * uj).sum(-1, keepdim=True) * ui) / zi.norm(dim=-1, keepdim=True)


def sup_info_nce(z, y, tau):
    """Supervised InfoNCE of z (N, D): rows with the same label y (N,) are positives; y = [0..B-1] * 2 is SimCLR."""
    u = unit(z)
    eye = torch.eye(len(z), dtype=torch.bool)
    sim = (u @ u.T / tau).masked_fill(eye, -math.inf)  # (N, N); never your own negative
    log_prob = sim - sim.logsumexp(dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~eye
    n_pos = pos.sum(1)
    has_pos = n_pos > 0  # a sample alone in its class in this batch has nothing to pull
    return -(log_prob.masked_fill(~pos, 0).sum(1)[has_pos] / n_pos[has_pos]).mean()


def info_nce_fixed(z, t, negatives, tau):
    """InfoNCE (eq. 1), (M,), of each row of z (M, D) against a fixed positive t (D,) and fixed negatives (K, D)."""
    logits = cos(z[:, None], torch.cat([t[None], negatives])[None]) / tau  # (M, 1 + K)
    return logits.logsumexp(1) - logits[:, 0]


def spearman(a, b):
    rank = lambda v: v.argsort().argsort().double()  # ties have probability zero here
    return torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1].item()


def fit_exponent(x, y):
    """Least-squares slope a of log y = a log x + b."""
    lx, ly = (torch.log(torch.tensor(v, dtype=torch.float64)) for v in (x, y))
    return (((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum()).item()


def print_table(title, rows):
    cols = list(rows[0])
    cells = [[f"{r[c]:.7g}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    for row in [cols, *cells]:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def save(out, name, result, draw):
    """Write out/name.csv (rows), .json (all) and, if matplotlib imports, .png by draw(plt), each atomically; print."""
    os.makedirs(out, exist_ok=True)
    rows, paths = result["rows"], [os.path.join(out, f"{name}.{ext}") for ext in ("csv", "json")]
    table = [list(rows[0]), *([r[k] for k in rows[0]] for r in rows)]  # "\n": the OS's line end, as open() writes it
    safety.write_atomic(paths[0], lambda f: csv.writer(f, lineterminator="\n").writerows(table))
    safety.write_atomic(paths[1], lambda f: json.dump(result, f, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no {name}.png: matplotlib is not installed (`pip install matplotlib` to draw it)")
    else:
        fig = draw(plt)
        fig.tight_layout()
        paths.append(os.path.join(out, f"{name}.png"))
        safety.write_atomic(paths[-1], lambda f: fig.savefig(f, format="png", dpi=120), "wb")
        plt.close(fig)
    print("wrote " + ", ".join(paths))


def decorate(ax, title, xlabel, ylabel, headline, legend="best", corner="left", title_size=9, **legend_kw):
    """Issue 17's figure rules: units on the axes, the n in the legend, the headline boxed; a PNG must read alone."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.title.set_fontsize(title_size or ax.title.get_fontsize())
    ax.legend(fontsize=7, loc=legend, **legend_kw)
    x, ha = (0.03, "left") if corner == "left" else (0.97, "right")  # always the top corner
    ax.text(x, 0.97, headline, transform=ax.transAxes, ha=ha, va="top", fontsize=7,
            bbox=dict(boxstyle="round", fc="white", ec="0.6", alpha=0.9))


def line_plot(plt, series, title, xlabel, ylabel, headline, log=False, counts=""):
    """One figure, a line per {label: (x, y)} in series; counts names the axes ("x", "y") that count steps or epochs."""
    from matplotlib import ticker  # only called from inside draw(plt), so matplotlib is there
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for label, (x, y) in series.items():
        ax.plot(x, y, "o-", label=label)
    if log:
        ax.set(xscale="log", yscale="log")
    for axis in (getattr(ax, f"{name}axis") for name in counts):
        # Counts read 20, 100, 200, never 2x10^1 or 12.5; on a log axis spanning under 2 decades, label 2..9 too.
        if log:
            axis.set_major_formatter(ticker.LogFormatter())
            axis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        else:
            axis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.margins(y=0.2)  # headroom, so the headline box in the corner does not hide the data
    decorate(ax, title, xlabel, ylabel, headline)
    return fig, ax


def descent(loss, z):
    """-d loss / d z (M, D): where a gradient step moves each row of z; loss (M, D) -> (M,) has independent rows."""
    z = z.detach().clone().requires_grad_(True)
    return -torch.autograd.grad(loss(z).sum(), z)[0]


def random_pairs(norms, n, d):
    """For each norm, n standard-normal pairs scaled to that norm: (K, n, d) twice."""
    rho = torch.tensor(norms, dtype=torch.float64)[:, None, None]
    return [unit(torch.randn(len(norms), n, d, dtype=torch.float64)) * rho for _ in range(2)]


def align(z1, z2, wd=None, lr=10.0, max_steps=20000, stop=True):
    """GD on the embeddings (App. B.1), mean[-cos(z1, z2) + wd/2 (|z1|^2 + |z2|^2)], K cells z1, z2 (K, n, d) at once.
    Per cell (K,): first step with mean cos > 1 - THRESHOLD (or -1), last mean cos and norm, diverged (norm > 1e6)."""
    K, n = z1.shape[:2]
    wd = torch.zeros(K, dtype=z1.dtype) if wd is None else wd
    steps, diverged = torch.full((K,), -1), torch.zeros(K, dtype=torch.bool)
    last_cos, last_norm = torch.zeros(K, dtype=z1.dtype), torch.zeros(K, dtype=z1.dtype)
    live = torch.arange(K)  # cells still being optimized; z1, z2 hold only these
    for t in range(max_steps + 1):
        # cos_grad for both sides, sharing the normalizations: this loop is the hot path.
        n1, n2 = z1.norm(dim=-1, keepdim=True), z2.norm(dim=-1, keepdim=True)  # (k, n, 1)
        u1, u2 = z1 / n1, z2 / n2
        c = (u1 * u2).sum(-1, keepdim=True)  # (k, n, 1)
        last_cos[live] = c.mean((1, 2))
        last_norm[live] = torch.cat([n1, n2], 1).mean((1, 2))
        steps[live[(last_cos[live] > 1 - THRESHOLD) & (steps[live] < 0)]] = t
        diverged[live] = last_norm[live] > 1e6
        keep = ~diverged[live] & ((steps[live] < 0) if stop else True)
        if t == max_steps or not keep.any():
            break
        if not keep.all():
            live, z1, z2, u1, u2, n1, n2, c = (v[keep] for v in (live, z1, z2, u1, u2, n1, n2, c))
        # The loss is a mean over n pairs, so each embedding's gradient carries a 1/n.
        lam = wd[live][:, None, None]  # (k, 1, 1)
        g1, g2 = (-(u2 - c * u1) / n1 + lam * z1) / n, (-(u1 - c * u2) / n2 + lam * z2) / n
        z1, z2 = z1 - lr * g1, z2 - lr * g2
    return steps, last_cos, last_norm, diverged


# ----------------------------------------------------------------------------- subcommands
def sim_gradients(quick=False):
    """Prop. 3.1, 3.2, Cor. 3.3: cos and InfoNCE gradients are orthogonal to z_i and ~1/||z_i||, so steps grow z_i."""
    n, d = 200 if quick else 5000, 8
    zi, zj = (torch.randn(n, d, dtype=torch.float64) * torch.exp(torch.randn(n, 1)) for _ in range(2))  # ~2 decades
    g = descent(lambda z: -cos(z, zj), zi)  # autograd of cos; rows are independent problems
    norm, sin_phi = zi.norm(dim=-1), sin_angle(zi, zj)
    lr = 10 ** torch.empty(n, 1, dtype=torch.float64).uniform_(-2, 1)  # step sizes 0.01..10
    new_norm = (zi + lr * g).norm(dim=-1)  # ascent or descent: the norm identity does not care about sign
    norm_gap = new_norm ** 2 - (norm ** 2 + lr[:, 0] ** 2 * g.norm(dim=-1) ** 2)
    worst = lambda dev: dev.abs().max().item()
    rows = [dict(check="|autograd - closed form|, cos (Prop 3.1)", max_dev=worst(g - cos_grad(zi, zj))),
            dict(check="| |grad| ||z_i|| / sin(phi) - 1 |", max_dev=worst(g.norm(dim=-1) * norm / sin_phi - 1)),
            dict(check="|cos(grad, z_i)|, cos", max_dev=worst(cos(g, zi))),
            dict(check="| |z'|^2 - |z|^2 - lr^2 |grad|^2 | / |z'|^2", max_dev=worst(norm_gap / new_norm ** 2))]
    # InfoNCE (Prop. 3.2): tangency, and rescaling row i by c_i divides its gradient by c_i.
    n_batches, B = (5, 32) if quick else (50, 64)
    tangency, scaling, shrunk = 0.0, 0.0, 0
    for _ in range(n_batches):
        z = torch.randn(2 * B, 16, dtype=torch.float64) * torch.exp(torch.randn(2 * B, 1))  # (2B, D)
        c = torch.exp(torch.randn(2 * B, 1, dtype=torch.float64))  # (2B, 1) random rescaling
        y = torch.arange(B).repeat(2)  # view k of image b is row b + k*B
        ga, gb = (-descent(lambda v: sup_info_nce(v, y, tau=0.5), v) for v in (z, c * z))  # d loss / d z, d loss / d cz
        tangency = max(tangency, cos(ga, z).abs().max().item())
        scaling = max(scaling, ((c * gb - ga).abs().max() / ga.abs().max()).item())
        shrunk += int(((z - 1.0 * ga).norm(dim=-1) < z.norm(dim=-1)).sum())
    rows += [dict(check="|cos(grad, z_i)|, InfoNCE (Prop 3.2)", max_dev=tangency),
             dict(check="|c grad(c z) - grad(z)| / max|grad|, InfoNCE", max_dev=scaling),
             dict(check="InfoNCE steps (lr=1) that shrank a norm", max_dev=float(shrunk))]
    print_table(f"gradients: {n} random pairs in R^{d}, {n_batches} InfoNCE batches of {B} pairs (float64)", rows)
    def draw(plt):  # |grad| / sin(phi) against |z_i|: every pair on the line 1/|z_i|
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        ax.loglog(norm, g.norm(dim=-1) / sin_phi, "o", ms=3, alpha=0.5,
                  label=f"autograd, random pairs in R^{d} (n = {n})")
        r = torch.logspace(math.log10(norm.min()), math.log10(norm.max()), 50)
        ax.loglog(r, 1 / r, "k-", lw=0.8, label="1 / |z_i|  (Prop 3.1)")
        decorate(ax, "Prop 3.1: the cos-sim gradient has length sin(phi) / |z_i|", "embedding norm |z_i| (unitless)",
                 "|grad cos(z_i, z_j)| / sin(phi) (unitless)",
                 f"max | |grad| |z_i| / sin(phi) - 1 | = {rows[1]['max_dev']:.1e}\n"
                 f"max |cos(grad, z_i)| = {rows[2]['max_dev']:.1e}", legend="lower left", corner="right")
        return fig
    return dict(rows=rows, n_pairs=n, n_batches=n_batches), draw


def sim_landscape(quick=False):
    """Fig. S1, Fig. 1 (App. A.1, Sec. 3): -cos(z, t)'s level lines are rays; its step, as InfoNCE's (Prop. 3.2), is
    tangent and sin(phi)/|z| long (Prop. 3.1): |z'|^2 = |z|^2 + lr^2 |grad|^2 (Cor. 3.3), so small z grow fast."""
    t = torch.tensor([1.0, 0.0], dtype=torch.float64)
    neg_deg = (105.0, 200.0, 250.0)  # three negatives, our choice: uneven, so InfoNCE's field differs from cos's
    negatives = torch.tensor([[math.cos(a), math.sin(a)] for a in map(math.radians, neg_deg)], dtype=torch.float64)
    tau = 0.5  # SimCLR's temperature, as in `gradients`
    losses = {"cos": lambda z: -cos(z, t), "InfoNCE": lambda z: info_nce_fixed(z, t, negatives, tau)}
    lr = 0.3  # one step, drawn to scale: long enough to see, short enough to stay readable
    # Not powers of 2: scaling by those is exact in floating point, so the 1/|z| check would pass trivially.
    norms, n_angles = [0.6, 1.2, 2.4], (12 if quick else 24)
    circle = lambda angle: torch.stack([angle.cos(), angle.sin()], 1)  # (A,) angles -> (A, 2) unit directions
    # Offset by half a slot so no point sits exactly on t or -t, where the cos field is 0.
    u = circle((torch.arange(n_angles, dtype=torch.float64) + 0.5) * 2 * math.pi / n_angles)  # (A, 2)
    rows, steps = [], {}
    for name, loss in losses.items():
        g_unit = descent(loss, u)  # (A, 2) the field on the unit circle
        for r in norms:
            z = r * u  # (A, 2)
            g = descent(loss, z)  # (A, 2) autograd, not the closed form: this checks Prop 3.1
            new_norm, g_norm = (z + lr * g).norm(dim=-1), g.norm(dim=-1)
            pythagoras = ((new_norm**2 - r**2 - lr**2 * g_norm**2) / new_norm**2).abs().max().item()  # Cor 3.3: 0
            rows.append(dict(loss=name, norm=r, points=n_angles,
                             max_abs_cos_step_z=cos(g, z).abs().max().item(),  # tangent: 0
                             max_dev_norm_x_step=(r * g_norm / g_unit.norm(dim=-1) - 1).abs().max().item(),  # 1/r: 0
                             mean_step_length=(lr * g_norm).mean().item(), min_norm_gain=(new_norm - r).min().item(),
                             max_norm_gain=(new_norm - r).max().item(), max_dev_pythagoras=pythagoras))
            steps[name, r] = (z, lr * g)
    # Fig. S1 in numbers: the loss along rays that span two decades of norm.
    n_rays, radii = (36 if quick else 72), torch.logspace(-1, 1, 9 if quick else 41, dtype=torch.float64)  # 0.1..10
    ray_u = circle(torch.arange(n_rays, dtype=torch.float64) * 2 * math.pi / n_rays)  # (R, 2), includes t and -t
    landscape = []
    for name, loss in losses.items():
        values = loss((radii[:, None, None] * ray_u).reshape(-1, 2)).reshape(len(radii), n_rays)  # (radii, rays)
        landscape.append(dict(loss=name, rays=n_rays, radii=len(radii),
                              max_spread_along_rays=(values.max(0).values - values.min(0).values).max().item(),
                              loss_min=values.min().item(), loss_max=values.max().item()))
    print_table(f"landscape: one gradient step (lr={lr}) from {n_angles} points on each circle |z| = r; "
                f"positive t = (1, 0), InfoNCE with {len(neg_deg)} fixed negatives, tau={tau}", rows)
    print_table(f"landscape: loss along {n_rays} rays at {len(radii)} norms from 0.1 to 10 "
                "(spread 0 = level lines are rays)", landscape)
    def draw(plt):
        fig, axes = plt.subplots(1, 3, figsize=(16, 5.4))
        plane = ("z[0] (unitless)", "z[1] (unitless)")
        # (a) Fig. S1 on a grid with an even number of points, so z = 0 (where cos is undefined) is not on it.
        ax = axes[0]
        ticks = torch.linspace(-3.5, 3.5, 160, dtype=torch.float64)
        X, Y = torch.meshgrid(ticks, ticks, indexing="xy")
        L = losses["cos"](torch.stack([X, Y], -1).reshape(-1, 2)).reshape(X.shape)
        filled = ax.contourf(X, Y, L, levels=torch.linspace(-1, 1, 21).tolist(), cmap="viridis")
        ax.contour(X, Y, L, torch.linspace(-0.9, 0.9, 10).tolist(), colors="k", linewidths=0.6, linestyles="solid")
        fig.colorbar(filled, ax=ax, label="loss -cos(z, t) (unitless)", fraction=0.046)
        ax.plot(*t, "r*", ms=12, label="positive t")
        decorate(ax, "Fig. S1: the loss -cos(z, t) over the plane; level lines are rays", *plane,
                 f"spread of the loss along each ray <= {landscape[0]['max_spread_along_rays']:.1e}\n"
                 f"(n = {n_rays} rays x {len(radii)} norms from 0.1 to 10)", legend="lower left")
        # (b), (c) Fig. 1: one gradient step from points on three circles, arrows to scale.
        for ax, name in zip(axes[1:], losses):
            ours = [x for x in rows if x["loss"] == name]
            for r, colour in zip(norms, ("tab:red", "tab:orange", "tab:blue")):
                z, step = steps[name, r]
                ax.add_patch(plt.Circle((0, 0), r, fill=False, color=colour, lw=0.8, ls=":"))
                ax.quiver(z[:, 0], z[:, 1], step[:, 0], step[:, 1], angles="xy", scale_units="xy", scale=1,
                          color=colour, width=0.005, label=f"|z| = {r:g}: n = {n_angles} points")
                # Follow the longest step: where it lands, and the circle it lands on.
                end = (z + step)[step.norm(dim=-1).argmax()]
                ax.add_patch(plt.Circle((0, 0), end.norm().item(), fill=False, color=colour, lw=0.8))
                ax.annotate(f"|z| {r:g} -> {end.norm():.3f}", end.tolist(), xytext=(4, 4),
                            textcoords="offset points", fontsize=7, color=colour)
            ax.plot(*t, "k*", ms=12, label="positive t")
            if name == "InfoNCE":
                ax.plot(*negatives.T, "kx", ms=9, mew=2, label=f"negatives (n = {len(negatives)})")
            title = f"Fig. 1: one gradient step on {name}, lr = {lr}" + (f", tau = {tau}" if name == "InfoNCE" else "")
            decorate(ax, title, *plane,
                     f"tangent: max |cos(step, z)| = {max(x['max_abs_cos_step_z'] for x in ours):.0e}\n"
                     f"|step| |z| same on all circles\n  to {max(x['max_dev_norm_x_step'] for x in ours):.0e}\n"
                     f"|z| grew at all {len(norms) * n_angles} points\nsolid circle: |z| after\n  the longest step",
                     legend="lower left")
        plt.setp(axes, xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), aspect="equal")
        return fig
    return dict(rows=rows, landscape=landscape, lr=lr, tau=tau, negatives_deg=list(neg_deg)), draw


def sim_bound(quick=False):
    """Thm. 3.4: one step of size lr on -cos(z_i, z_j), |z_i| = |z_j| = rho, angle phi, m of them moving, raises the cos
    by at most m lr sin(phi) / rho^2 (m lr sin(phi)^2 / rho^2 if phi <= pi/2): by Prop. 3.1 each turns by
    theta = arctan(lr sin(phi) / rho^2), so exactly Delta-cos = cos(phi - m theta) - cos(phi)."""
    rhos = [0.5, 1, 2, 4] if quick else [0.25, 0.5, 1, 2, 4, 8]
    lrs = [1e-3, 0.1, 10] if quick else [1e-3, 1e-2, 0.1, 1, 10]
    phis = torch.linspace(0.05, math.pi - 0.05, 12 if quick else 40, dtype=torch.float64).tolist()
    grid = torch.tensor([(r, p, lr) for r in rhos for p in phis for lr in lrs], dtype=torch.float64)
    rho, phi, lr = grid.unbind(1)  # (M,) each
    # A random plane per cell in R^5, so nothing depends on the coordinate axes.
    e1, e2 = torch.linalg.qr(torch.randn(len(grid), 5, 2, dtype=torch.float64)).Q.unbind(-1)
    zi0, zj0 = rho[:, None] * e1, rho[:, None] * (phi.cos()[:, None] * e1 + phi.sin()[:, None] * e2)
    theta = torch.atan(lr * phi.sin() / rho**2)
    zi1 = zi0 + lr[:, None] * descent(lambda z: -cos(z, zj0), zi0)  # one step of z_i; each cell its own
    zj1 = zj0 + lr[:, None] * descent(lambda z: -cos(zi0, z), zj0)  # and of z_j, from the same start
    rows = []
    for m, zj_new in ((1, zj0), (2, zj1)):  # m points move
        gain = cos(zi1, zj_new) - phi.cos()  # measured Delta-cos, (M,)
        exact = (phi - m * theta).cos() - phi.cos()
        general, first_order = m * lr * phi.sin() / rho**2, m * lr * phi.sin() ** 2 / rho**2  # the two bounds
        acute, small = phi <= math.pi / 2, lr == min(lrs)
        ratio_small = gain[small] / first_order[small]
        rows.append(dict(moving=m, max_dev_from_exact=(gain - exact).abs().max().item(),
                         worst_ratio_general=(gain / general).max().item(),
                         worst_ratio_acute=(gain[acute] / first_order[acute]).max().item(),
                         worst_ratio_obtuse=(gain[~acute] / first_order[~acute]).max().item(),
                         small_lr_ratio_min=ratio_small.min().item(), small_lr_ratio_max=ratio_small.max().item()))
        if m == 1:  # how the best one-step gain over all angles falls with the norm
            best = [dict(rho=float(r), lr=0.1, max_gain=b, max_gain_times_rho2=b * r**2)
                    for r, b in ((r, gain[(lr == 0.1) & (rho == r)].max().item()) for r in rhos)]
    print_table(f"bound: {len(grid)} cells (rho x phi x lr), measured Delta-cos / bound; small lr = {min(lrs)}", rows)
    print_table("bound: largest one-step gain over phi, one moving point", best)
    def draw(plt):
        rho_ = [b["rho"] for b in best]
        worst = max(r["worst_ratio_general"] for r in rows)
        fig, ax = line_plot(plt, {f"measured, max over n = {len(phis)} angles": (rho_, [b["max_gain"] for b in best])},
                            "Thm 3.4: one step on -cos(z_i, z_j), lr = 0.1, z_j fixed",
                            "rho = |z_i| = |z_j| (unitless)", "largest one-step gain in cos (unitless)",
                            f"measured gain / bound <= {worst:.4f}\nover all {len(grid)} cells (rho x phi x lr)",
                            log=True)
        # The bound m lr sin(phi) / rho^2 is largest at phi = pi/2: lr / rho^2.
        ax.plot(rho_, [0.1 / r**2 for r in rho_], "k--", lw=1, label="bound lr / rho^2 (Thm 3.4)")
        ax.legend(fontsize=7, loc="lower left")
        return fig
    return dict(rows=rows, best_gain_by_rho=best), draw


def sim_norms(quick=False):
    """Fig. 2a (top), App. B.1: steps to align n pairs grow like (initial norm)^2."""
    norms, n = ([1, 2, 3, 4], 200) if quick else ([0.25, 0.5, 0.75, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 500)
    steps, _, final, _ = align(*random_pairs(norms, n, d=20))
    rows = [dict(norm=float(r), steps=int(s), norm_at_convergence=f.item()) for r, s, f in zip(norms, steps, final)]
    exponent = fit_exponent(norms, steps.tolist()) if (steps > 0).all() else math.nan
    print_table(f"norms: {n} pairs in R^20, GD lr=10 on mean cos; steps until mean cos > 1 - {THRESHOLD}", rows)
    print(f"fitted exponent a in steps ~ norm^a: {exponent:.3f} (theory: 2)")
    draw = lambda plt: line_plot(plt, {f"measured, n = {n} pairs per point": (norms, steps.tolist())},
                                 "Fig 2a (top): steps to align pairs grow like norm^2",
                                 "initial embedding norm |z| (unitless)",
                                 f"steps until mean cos > 1 - {THRESHOLD} (steps)",
                                 f"fitted exponent: steps ~ norm^{exponent:.3f}  (theory: 2)", log=True, counts="y")[0]
    return dict(rows=rows, exponent=exponent), draw


def sim_angles(quick=False):
    """Fig. 2a bottom, App. B.1, C.2: only starting angles near pi, where the gradient vanishes, slow alignment much."""
    alphas = [-0.5, 0.0, 0.5, 0.9, 0.99, 0.999] if quick else \
        [-0.9, -0.6, -0.3, 0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999]
    n, d = 200 if quick else 500, 20
    z = unit(torch.randn(len(alphas), n, d, dtype=torch.float64))  # (K, n, d)
    a = torch.tensor(alphas, dtype=torch.float64)[:, None, None]
    # a -> 1 pushes the positive to the antipode -z, a -> -1 onto z itself.
    positive = unit((1 - a.abs()) * unit(torch.randn_like(z)) - a * z)
    start = torch.acos(cos(z, positive).clamp(-1, 1)).mean(-1)  # (K,) mean starting angle
    steps = align(z, positive, max_steps=50000)[0]
    rows = [dict(a=al, mean_angle_deg=math.degrees(s.item()), steps=int(t)) for al, s, t in zip(alphas, start, steps)]
    print_table(f"angles: {n} unit pairs in R^{d}, GD lr=10; steps until mean cos > 1 - {THRESHOLD}", rows)
    slow = rows[-1]["steps"] / next(r["steps"] for r in rows if r["a"] == 0.0)  # a = 0: 90 degrees
    series = {f"measured, n = {n} pairs per point": ([r["mean_angle_deg"] for r in rows], steps.tolist())}
    draw = lambda plt: line_plot(plt, series, "Fig 2a (bottom): only starting angles near 180 degrees slow alignment",
                                 "mean starting angle (degrees)", f"steps until mean cos > 1 - {THRESHOLD} (steps)",
                                 f"steps at {rows[-1]['mean_angle_deg']:.1f} deg / steps at 90 deg = {slow:.1f}",
                                 counts="y")[0]
    return dict(rows=rows), draw


def sim_weight_decay(quick=False):
    """Table 1: `norms` plus (lambda/2)|z|^2 per embedding: moderate lambda shrinks the norms and converges sooner; too
    much fails. A step scales z by (1 - lr lambda / n), whose sign flips past lambda = 2n/lr ("diverged"); less
    pulls norms to ~sqrt(lr/n), where angles grow |1 - 2 lr / (n rho^2)| > 1-fold a step (Thm. 3.4; "collapsed")."""
    norms = [1, 4] if quick else [1, 4, 7]
    lambdas = [0, 0.1, 1, 30, 300] if quick else [0, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 300]
    n, lr, max_steps = (200, 10.0, 1000) if quick else (500, 10.0, 6000)
    cells = [(r, lam) for r in norms for lam in lambdas]
    wd = torch.tensor([lam for _, lam in cells], dtype=torch.float64)
    steps, final_cos, final_norm, diverged = align(*random_pairs([r for r, _ in cells], n, d=20), wd, lr=lr,
                                                   max_steps=max_steps, stop=False)
    rows = []
    for (r, lam), s, c, nrm, div in zip(cells, steps, final_cos, final_norm, diverged):
        status = "diverged" if div else int(s) if s >= 0 else "collapsed" if nrm < r else "not converged"
        rows.append(dict(norm=float(r), wd=float(lam), steps=status, cos_at_end=c.item(), norm_at_end=nrm.item()))
    cell = {(x["norm"], x["wd"]): x for x in rows}
    pivot = lambda key: [dict(wd=float(lam), **{f"norm {r}": cell[r, lam][key] for r in norms}) for lam in lambdas]
    table = pivot("steps")
    for line in table:  # does steps ~ norm^2 survive the decay? fit over the norms, per lambda
        steps_ = [line[f"norm {r}"] for r in norms]
        line["exponent"] = fit_exponent(norms, steps_) if all(isinstance(s, int) for s in steps_) else "-"
    print_table(f"weight-decay: steps until mean cos > 1 - {THRESHOLD} ({n} pairs in R^20, lr=10); "
                "exponent = fitted a in steps ~ norm^a", table)
    print_table(f"weight-decay: mean cos after all {max_steps} steps", pivot("cos_at_end"))
    print_table(f"weight-decay: mean norm after all {max_steps} steps (sqrt(lr/n) = {math.sqrt(lr / n):.3g})",
                pivot("norm_at_end"))
    def draw(plt):
        ok = {r: [x for x in rows if x["norm"] == r and x["wd"] > 0 and isinstance(x["steps"], int)] for r in norms}
        series = {f"initial norm {r}, n = {n} pairs per point": ([x["wd"] for x in ok[r]], [x["steps"] for x in ok[r]])
                  for r in norms}
        # Headline: per norm, lambda = 0 against the fastest lambda; and which lambdas failed.
        best = {r: min(ok[r], key=lambda x: x["steps"]) for r in norms if ok[r]}
        lines = [f"norm {r}: {cell[r, 0]['steps']} steps at lambda=0, {b['steps']} at lambda={b['wd']:g}"
                 for r, b in best.items()]
        failed = sorted({x["wd"] for x in rows if not isinstance(x["steps"], int)})
        if failed:
            lines.append("not drawn, never converged: lambda = " + ", ".join(f"{lam:g}" for lam in failed))
        fig, ax = line_plot(plt, series, f"Table 1: weight decay on the embeddings, GD lr={lr:g}",
                            "weight decay lambda (unitless)", f"steps until mean cos > 1 - {THRESHOLD} (steps)",
                            "\n".join(lines), log=True, counts="y")
        for line, r in zip(ax.get_lines(), norms):  # lambda = 0 has no place on a log axis: a level line
            if isinstance(cell[r, 0]["steps"], int):
                ax.axhline(cell[r, 0]["steps"], color=line.get_color(), ls="--", lw=1, label=f"norm {r}, lambda = 0")
        ax.legend(fontsize=7, loc="best")
        return fig
    return dict(rows=rows, table=table), draw


def _classes(n_classes=4, dim=10, obs=64, noise=0.3):
    """App. B.2: class centres uniform on the unit sphere in R^dim, mapped linearly to R^obs; sample(sizes) -> x (N,
    obs), latent (N, dim), y (N,). noise (ours) puts a point ~45 degrees from its centre: density varies in a class."""
    centres = unit(torch.randn(n_classes, dim))
    lift = torch.randn(obs, dim) / math.sqrt(dim)  # keeps |x| ~ 1
    def sample(sizes):
        y = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
        latent = unit(centres[y] + noise * torch.randn(len(y), dim))
        return latent @ lift.T, latent, y
    return sample


def _train_supcon(x, y, epochs, on_epoch, batch=128, tau=0.1, lr=1e-3):
    """Train a fresh MLP R^64 -> R^10 with supervised InfoNCE and Adam; on_epoch(epoch, z) sees all embeddings at
    epoch 0 (untrained) and after each epoch. tau and lr: our choice (common SupCon defaults), not tuned."""
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(mlp.parameters(), lr=lr)
    for epoch in range(epochs + 1):
        for idx in torch.randperm(len(y)).split(batch) if epoch else []:  # epoch 0: no step
            opt.zero_grad()
            sup_info_nce(mlp(x[idx]), y[idx], tau).backward()
            opt.step()
        with torch.no_grad():
            on_epoch(epoch, mlp(x))


def sim_density(quick=False):
    """Sec. 4.2, Fig. 2b, App. B.2: training gives denser regions larger norms (anti-correlated with k-NN distance).
    The latent-space k-NN is the cleaner evidence: in embedding space an untrained ReLU net is already biased."""
    per_class, epochs = (250, 30) if quick else (1000, 100)
    x, latent, y = _classes()([per_class] * 4)
    seen = {}
    _train_supcon(x, y, epochs, seen.__setitem__)
    z_init, z = seen[0], seen[epochs]  # (N, 10) each
    # (N, D) -> (N,): the cosine distance from each row to its 10th nearest other row, the inverse density
    knn_distance = lambda e: (1 - unit(e) @ unit(e).T).fill_diagonal_(math.inf).kthvalue(10, dim=1).values
    knn_latent = knn_distance(latent)
    rows = [dict(network=name, spearman_embedding_knn=spearman(e.norm(dim=-1), knn_distance(e)),
                 spearman_latent_knn=spearman(e.norm(dim=-1), knn_latent), mean_norm=e.norm(dim=-1).mean().item())
            for name, e in (("untrained", z_init), (f"trained {epochs} ep", z))]
    print_table(f"density: 4 classes x {per_class} points, Spearman(norm, 10-NN cosine distance); "
                "negative = denser points have larger norms", rows)
    def draw(plt):
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        for c in range(4):
            ax.scatter(knn_latent[y == c], z[y == c].norm(dim=-1), s=3, label=f"class {c} (n = {per_class})")
        decorate(ax, f"Fig 2b: after {epochs} epochs of SupCon, denser points have larger norms",
                 "10-NN cosine distance in latent space (unitless)", "embedding norm |z| (unitless)",
                 f"Spearman rho(norm, 10-NN distance), n = {len(y)}:\n"
                 f"{rows[1]['spearman_latent_knn']:.3f} trained, {rows[0]['spearman_latent_knn']:.3f} untrained",
                 legend="lower right", corner="right", markerscale=3)
        return fig
    return dict(rows=rows), draw


def sim_imbalance(quick=False):
    """Fig. 2c: with class frequencies 1:2:4:8 the frequent classes end with larger norms. The frequencies rotate over
    the 4 classes and norms are averaged, as how close 4 random centres sit swamps the effect in one run."""
    scale, epochs, every, seeds = (33, 30, 10, 2) if quick else (267, 100, 20, 2)
    freqs, history = [1, 2, 4, 8], {}  # history: epoch -> list over runs of mean norm per frequency
    for _ in range(seeds):
        sample = _classes()
        for rot in range(4):
            freq_of = [freqs[(c + rot) % 4] for c in range(4)]  # class c -> its frequency
            x, _, y = sample([scale * f for f in freq_of])
            def record(epoch, z):
                if epoch > 0 and epoch % every == 0:
                    norm = {freq_of[c]: z[y == c].norm(dim=-1).mean().item() for c in range(4)}
                    history.setdefault(epoch, []).append([norm[f] for f in freqs])
            _train_supcon(x, y, epochs, record)
    rows = [dict(epoch=e, **{f"x{f}": sum(run[k] for run in runs) / len(runs) for k, f in enumerate(freqs)})
            for e, runs in sorted(history.items())]
    print_table(f"imbalance: mean embedding norm per class frequency (class sizes {scale} x 1:2:4:8), "
                f"mean of {seeds} seeds x 4 rotations", rows)
    # Over only 4 classes rho can be 1, 0.8, 0.4, ...: it says whether the order is exact.
    rho = spearman(torch.tensor(freqs, dtype=torch.float64), torch.tensor([rows[-1][f"x{f}"] for f in freqs]))
    print(f"Spearman rho(class frequency, norm at epoch {epochs}) over the 4 classes: {rho:.2f}")
    series = {f"x{f}: {scale * f} points, mean of {seeds * 4} runs": ([r["epoch"] for r in rows],
                                                                     [r[f"x{f}"] for r in rows]) for f in freqs}
    draw = lambda plt: line_plot(plt, series, "Fig 2c: classes seen more often get larger norms (frequencies 1:2:4:8)",
                                 "training epoch (epochs)", "mean embedding norm of the class (unitless)",
                                 f"Spearman rho(frequency, final norm) = {rho:.2f}  (n = 4 classes)", counts="x")[0]
    return dict(rows=rows, seeds=seeds, spearman_freq_norm=rho), draw


def sim_gradscale(quick=False):
    """App. D, Prop. D.1: GradScale turns the cos-sim field into F_p(z) = |z|^p grad cos(z, t), |z|^(p-1) sin(phi) long.
    For p != 0 no loss has it: around 1<r<2, pi/4<phi<3pi/4 it integrates to (2^p - 1)(cos(3pi/4) - cos(pi/4))."""
    t = torch.tensor([1.0, 0.0], dtype=torch.float64)  # the fixed positive
    field = lambda z, p: descent(lambda z: -cos(gradscale(z, p), t), z)  # (M, 2): what GD sees through GradScale
    def loop_integral(path, p):  # around the closed polygon path (M, 2); 2-point Gauss rule per edge
        seg = path.roll(-1, 0) - path  # (M, 2)
        nodes = (0.5 - 0.5 / math.sqrt(3), 0.5 + 0.5 / math.sqrt(3))
        return sum(0.5 * (field(path + k * seg, p) * seg).sum().item() for k in nodes)
    m = 500 if quick else 4000  # points per edge
    s = torch.linspace(0, 1, m + 1, dtype=torch.float64)[:-1]
    arc = lambda r, a, b: r * torch.stack([torch.cos(a + (b - a) * s), torch.sin(a + (b - a) * s)], 1)
    ray = lambda a, r0, r1: (r0 + (r1 - r0) * s)[:, None] * torch.tensor([math.cos(a), math.sin(a)], dtype=s.dtype)
    lo, hi = math.pi / 4, 3 * math.pi / 4
    sector = torch.cat([ray(lo, 1, 2), arc(2, lo, hi), ray(hi, 2, 1), arc(1, hi, lo)])  # counter-clockwise
    corners = torch.tensor([[0.5, 0.5], [2.0, 0.5], [2.0, 2.0], [0.5, 2.0]], dtype=torch.float64)
    square = torch.cat([corners[k] + s[:, None] * (corners[(k + 1) % 4] - corners[k]) for k in range(4)])
    grid = torch.randn(2000, 2, dtype=torch.float64) * torch.exp(torch.randn(2000, 1))  # many norms
    sin_phi = sin_angle(grid, t.expand_as(grid))
    rows = []
    for p in (0.0, 0.5, 1.0, 2.0):
        magnitude = field(grid, p).norm(dim=-1) / (grid.norm(dim=-1) ** (p - 1) * sin_phi)  # 1 by Prop. D.1
        closed_form = (2**p - 1) * (math.cos(hi) - math.cos(lo)) + 0.0  # + 0.0 turns -0.0 into 0.0
        rows.append(dict(power=p, max_rel_dev_magnitude=(magnitude - 1).abs().max().item(),
                         sector_loop=loop_integral(sector, p), sector_closed_form=closed_form,
                         square_loop=loop_integral(square, p)))
    print_table(f"gradscale: field magnitude vs |z|^(p-1) sin(phi) on {len(grid)} points; "
                f"closed-loop integrals ({m} points per edge)", rows)
    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(10, 5.2), subplot_kw=dict(aspect="equal"))
        ticks = torch.linspace(-2, 2, 17, dtype=torch.float64)
        xy = torch.stack(torch.meshgrid(ticks, ticks, indexing="xy"), -1).reshape(-1, 2)  # (289, 2)
        xy = xy[xy.norm(dim=-1) > 0.2]
        for ax, r in zip(axes, (rows[0], rows[2])):  # p = 0 and p = 1
            f = field(xy, r["power"])
            ax.quiver(xy[:, 0], xy[:, 1], f[:, 0], f[:, 1], label=f"field F_p(z), n = {len(xy)} grid points")
            ax.plot(*sector.T, lw=1, label="loop: sector 1 < |z| < 2, 45-135 degrees")
            ax.plot(*t, "r*", ms=10, label="positive t")
            decorate(ax, f"power p = {r['power']:g}", "z[0] (unitless)", "z[1] (unitless)",
                     f"loop integral around the sector = {r['sector_loop']:.4f}\n"
                     f"closed form (2^p - 1)(cos 135 - cos 45) = {r['sector_closed_form']:.4f}",
                     legend="lower left", title_size=None)
        fig.suptitle("App. D: GradScale turns the cos-sim field into a field no loss has (p != 0)", fontsize=10)
        return fig
    return dict(rows=rows), draw


SUBCOMMANDS = {  # name -> (function, one line for --help)
    "gradients": (sim_gradients, "Prop 3.1-3.2, Cor 3.3: closed-form gradient, tangency, 1/|z| scaling"),
    "landscape": (sim_landscape, "Fig S1, Fig 1: level lines are rays; a step is tangent, 1/|z| long, grows |z|"),
    "bound": (sim_bound, "Thm 3.4: one step raises the cosine by at most ~lr sin(phi)/rho^2"),
    "norms": (sim_norms, "Fig 2a top: steps to converge grow like (initial norm)^2"),
    "angles": (sim_angles, "Fig 2a bottom: only starting angles near pi slow convergence"),
    "weight-decay": (sim_weight_decay, "Table 1: moderate weight decay speeds convergence, too much fails"),
    "density": (sim_density, "Fig 2b: denser regions get larger embedding norms"),
    "imbalance": (sim_imbalance, "Fig 2c: more frequent classes get larger embedding norms"),
    "gradscale": (sim_gradscale, "Prop D.1: GradScale rescales the field and is not a gradient"),
}


def run(name, seed=0, out="runs/simulate", quick=False):
    """Run one subcommand with a fresh seed; save its files; return its result dict."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    # Tiny tensors: one thread beats syncing several (~5x faster on 2 busy cores). Restored: tests share the process.
    torch.set_num_threads(1)
    try:
        result, draw = SUBCOMMANDS[name][0](quick=quick)
    finally:
        torch.set_num_threads(threads)
    save(out, name.replace("-", "_"), result, draw)
    return result


def main(argv=None):
    parser = safety.Parser(description="Check the theory of Draganov et al. (ICML 2025) numerically, on the CPU.")
    sub = parser.add_subparsers(dest="name", required=True, metavar="name")
    for name, (_, summary) in [*SUBCOMMANDS.items(), ("all", (None, "run every subcommand in order"))]:
        one = sub.add_parser(name, help=summary, description=summary)
        one.add_argument("--seed", type=int, default=0, help="seed for every random draw (default 0)")
        one.add_argument("--out", default="runs/simulate", help="folder for the CSV/JSON/PNG files")
        one.add_argument("--quick", action="store_true", help="reduced sizes, seconds each (used by the tests)")
    args = parser.parse_args(argv)
    if not 0 <= args.seed < 2**63:  # torch.manual_seed's range
        parser.error(f"--seed must be an integer from 0 to 2**63 - 1, got {args.seed}")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, ...
        parser.error(f"cannot use --out {args.out} as the output folder ({e.strerror})")
    if not os.access(args.out, os.W_OK | os.X_OK):  # a read-only folder that exists already
        parser.error(f"cannot write into --out {args.out} (permission denied)")
    start = time.time()
    for name in list(SUBCOMMANDS) if args.name == "all" else [args.name]:
        t0 = time.time()
        run(name, seed=args.seed, out=args.out, quick=args.quick)
        print(f"[{name}: {time.time() - t0:.1f} s]")
    print(f"\ndone in {time.time() - start:.1f} s; files in {args.out}")


if __name__ == "__main__":
    safety.cli(main)
