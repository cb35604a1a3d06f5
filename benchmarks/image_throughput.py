"""Image training speed: flowmatch's training step against torchcfm's CIFAR-10 step, side by side in one
process, on 32x32x3 images.

    . .venv/bin/activate && bash benchmarks/install_peers.sh      # once: torchcfm, torch untouched
    python benchmarks/image_throughput.py --out runs/speed/cpu.json  # the CPU table (small preset, batch 32)
    python benchmarks/image_throughput.py --device cuda --out runs/speed/gpu.json
                                                                     # the GPU table (cifar preset, batch 128)
    python benchmarks/image_throughput.py --preset cifar --batch 8 --settings fp32 --warmup 1 --block 1 --rounds 5 \
        --levers fm-heads64,cfm-fmloop --no-memory --profile 1       # the cifar networks on the CPU, operators too
    python benchmarks/image_throughput.py --settings fp32 --rounds 2 --no-memory --levers none   # smoke test

The two steps (each library's own code; only the data is shared: the same synthetic images in
[0, 1], 2048 of them, held in memory and drawn by random index, scaled to [-1, 1] as both do):

- flowmatch: ``Trainer.optimisation_step`` of ``flowmatch.training`` on a ``TrainConfig`` for a .npy
  image array (``--model unet --unet PRESET``): data draw, noise and times, the linear path's MSE,
  backward, gradient clipping at 1.0, fused AdamW, the foreach EMA lerp (decay 0.9999);
  ``--precision bf16`` (autocast) and ``--compile`` are its own settings.
- torchcfm: the loop of its ``examples/images/cifar10/train_cifar10.py``: ``UNetModelWrapper``,
  ``ConditionalFlowMatcher(sigma=0.0).sample_location_and_conditional_flow``, ``net_model(t, xt)``,
  ``torch.mean((vt - ut) ** 2)``, backward, gradient clipping at 1.0, ``torch.optim.Adam`` (lr 2e-4,
  torch's default implementation) with the warm-up ``LambdaLR``, and the example's ``ema()``: a python
  loop over the state dict, ``target.copy_(target * decay + source * (1 - decay))``, decay 0.9999.
  Its DataLoader over torchvision's CIFAR-10 is replaced by the in-memory draw flowmatch uses.

The networks (``--preset``): ``cifar`` is flowmatch's ~35.7 M-parameter preset against the example's
network (num_channel 128, num_res_blocks 2, channel_mult 1-2-2-2, attention at 16x16, num_heads 4,
num_head_channels 64, dropout 0.1); ``small`` is flowmatch's CPU default at 32x32 (channels 32-64-64-128,
one block per level, attention in the middle block only, no dropout) against a ``UNetModelWrapper`` of the
same pattern (num_channels 32, channel_mult 1-2-2-4, num_res_blocks 1, attention only in its middle block,
dropout 0). Both libraries' UNets are the DDPM/ADM design (two convolutions per residual block with the
time embedding added between them, group norm and SiLU, nearest-neighbour upsampling, skip concatenation);
their parameter counts are printed.

A setting (``--settings``, comma list; parts joined by ``+``) is applied to both sides alike:
``fp32`` or ``bf16`` (autocast), ``channels-last`` (network and its input in NHWC), ``compile``
(``torch.compile`` of the network). bf16 is left out of the CPU default where the CPU has no bfloat16
units (AMX / AVX512-BF16): autocast then emulates it (~20x slower).

How it is timed: per setting, both steps (and the ``--levers`` variants) are built, warmed up (compilation
happens there; its time is reported), then timed in blocks of ``--block`` steps, round after round, the
order rotated every round so that contention from other jobs on the machine hits all alike. The table
gives the median images/s over the rounds and the ratio flowmatch/torchcfm. Peak memory comes from a fresh
subprocess per library and setting (CPU: peak resident set size, and its rise over the resident size
before the first step; CUDA: ``torch.cuda.max_memory_allocated``).

Threads: on the CPU the default is one torch thread per process (``--threads``). On a machine whose
cores other jobs share, torch's OpenMP threads wait on each other whenever one is descheduled: on the
2 shared cores this was measured on, a step of either library took 2 s with one thread and 6-15 s
(varying from step to step) with two.

Levers (``--levers``): variants timed in the same rotation as ``--lever-setting``, to show where the time goes:

- ``fm-heads64``: flowmatch's UNet with attention heads of 64 channels (torchcfm's num_head_channels); the
  diffusers UNet2DModel that flowmatch builds uses attention_head_dim 8 (32 heads at 256 channels). Same
  weights, only the split into heads differs.
- ``fm-groups32``: flowmatch's UNet with 32 groups in every group norm (torchcfm's GroupNorm32); the small
  preset uses 8 where the channels are fewer than 128.
- ``cfm-fmloop``: torchcfm's network in flowmatch's loop parts (fused AdamW, foreach EMA lerp): how much of
  the difference is the loop around the network and how much the network.

and a per-phase breakdown (``--breakdown``, ms per step: data and path, forward with loss, backward,
clipping, optimizer, EMA) of both steps at ``--lever-setting``, timed the same interleaved way.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

N_IMAGES, SHAPE, SEED = 2048, (3, 32, 32), 0
LEVERS = ("fm-heads64", "fm-groups32", "cfm-fmloop")


# ---------------------------------------------------------------- settings


def parse_setting(name: str) -> dict:
    parts = set(name.split("+"))
    known = {"fp32", "bf16", "channels-last", "compile"}
    if parts - known or ("fp32" in parts and "bf16" in parts):
        raise SystemExit(f"--settings: {name!r}: expected parts fp32 or bf16, channels-last, compile joined by '+'")
    return {"bf16": "bf16" in parts, "channels_last": "channels-last" in parts, "compile": "compile" in parts}


def cpu_has_bf16() -> bool:
    from flowmatch.training import cpu_has_bf16 as has

    return has()


def default_settings(device: torch.device) -> list[str]:
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return ["fp32", "channels-last"] + (["bf16", "bf16+channels-last", "bf16+compile", "bf16+channels-last+compile"]
                                           if bf16 else ["compile"])
    return ["fp32", "channels-last"] + (["bf16"] if cpu_has_bf16() else [])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_channels_last(model: torch.nn.Module) -> None:
    """NHWC weights, and the input made NHWC before the network sees it."""
    model.to(memory_format=torch.channels_last)

    def hook(module, args, kwargs):
        args = tuple(a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.dim() == 4 else a
                     for a in args)
        return args, kwargs

    model.register_forward_pre_hook(hook, with_kwargs=True)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- flowmatch's step


class FlowmatchStep:
    """flowmatch's own Trainer on a TrainConfig for the .npy image array; ``step`` is
    ``Trainer.optimisation_step`` (what ``Trainer.run`` calls once per step)."""

    lib = "flowmatch"

    def __init__(self, data_path: str, preset: str, batch: int, setting: dict, device: torch.device, out: str,
                 heads64: bool = False, groups32: bool = False):
        from accelerate import Accelerator

        from flowmatch.config import TrainConfig
        from flowmatch.training import Trainer

        self.device, self.batch = device, batch
        cfg = TrainConfig(data=data_path, model="unet", unet=preset, batch_size=batch, lr=2e-4, warmup_steps=5000,
                          schedule="constant", grad_clip=1.0, ema_decay=0.9999, seed=SEED, steps=10**9,
                          checkpoint_every=10**9, log_every=10**9, plots=False, holdout=0.0,
                          precision="bf16" if setting["bf16"] else "fp32", compile=setting["compile"])
        parts = cfg.build()
        model = parts.model
        self.params = n_params(model)
        if heads64:  # the same projections split into heads of 64 channels (scale follows the head width)
            for m in model.modules():
                if type(m).__name__ == "Attention":
                    width = m.to_q.out_features
                    m.heads, m.scale = max(1, width // 64), min(64, width) ** -0.5
        if groups32:
            for m in model.modules():
                if isinstance(m, torch.nn.GroupNorm) and m.num_channels % 32 == 0:
                    m.num_groups = 32
        if setting["channels_last"]:
            to_channels_last(model)
        accelerator = Accelerator(cpu=device.type == "cpu")
        tr = self.trainer = Trainer(cfg, parts, accelerator, Path(out), progress=False)
        tr.prepare()  # what Trainer.run sets up before its loop

    def step(self) -> None:
        self.trainer.optimisation_step()

    def phases(self, tick) -> None:
        """The same step cut at its phases (``tick(name)`` after each), for the breakdown."""
        tr, cfg = self.trainer, self.trainer.cfg
        drawn = tr.objective.draw(tr.dataset.sample(cfg.batch_size, tr.gen), tr.gen)
        tick("data + path")
        with torch.autocast(tr.device.type, dtype=tr.amp_dtype, enabled=tr.amp_dtype is not None):
            loss = tr.objective.loss(tr.forward, drawn)
        tick("forward + loss")
        loss.backward()
        tick("backward")
        torch.nn.utils.clip_grad_norm_(tr.params, cfg.grad_clip)
        tick("clip")
        tr.opt.step()
        tr.opt.zero_grad(set_to_none=True)
        tick("optimizer")
        with torch.no_grad():
            torch._foreach_lerp_(tr.ema_params, tr.params, 1 - cfg.ema_decay)
        tick("EMA")


# ---------------------------------------------------------------- torchcfm's step (examples/images/cifar10)


def torchcfm_network(preset: str, dropout_cifar: float = 0.1):
    from torchcfm.models.unet.unet import UNetModelWrapper

    torch.manual_seed(SEED)
    if preset == "cifar":  # train_cifar10.py's network
        return UNetModelWrapper(dim=SHAPE, num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2], num_heads=4,
                                num_head_channels=64, attention_resolutions="16", dropout=dropout_cifar)
    # flowmatch's small preset at 32x32 in the same pattern: 32-64-64-128, one block per level, attention in
    # the middle block only ("1": a downsampling factor of 32 that a 4-level UNet never reaches), no dropout
    return UNetModelWrapper(dim=SHAPE, num_res_blocks=1, num_channels=32, channel_mult=[1, 2, 2, 4], num_heads=4,
                            num_head_channels=64, attention_resolutions="1", dropout=0.0)


def example_ema(source, target, decay):
    """torchcfm's examples/images/cifar10/utils_cifar.py ``ema`` as written there."""
    source_dict = source.state_dict()
    target_dict = target.state_dict()
    for key in source_dict.keys():
        target_dict[key].data.copy_(target_dict[key].data * decay + source_dict[key].data * (1 - decay))


class TorchcfmStep:
    """One iteration of train_cifar10.py's loop (``fm_loop``: fused AdamW and a foreach EMA instead)."""

    lib = "torchcfm"

    def __init__(self, images: torch.Tensor, preset: str, batch: int, setting: dict, device: torch.device,
                 fm_loop: bool = False):
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

        self.device, self.batch, self.images, self.fm_loop = device, batch, images, fm_loop
        self.net = torchcfm_network(preset).to(device)
        self.params = n_params(self.net)
        self.ema_model = copy.deepcopy(self.net)
        if setting["channels_last"]:
            to_channels_last(self.net)
            self.ema_model.to(memory_format=torch.channels_last)
        if fm_loop:
            self.optim = torch.optim.AdamW(self.net.parameters(), lr=2e-4, weight_decay=0.0, fused=True)
            self.plist, self.elist = list(self.net.parameters()), list(self.ema_model.parameters())
        else:
            self.optim = torch.optim.Adam(self.net.parameters(), lr=2e-4)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optim, lr_lambda=lambda step: min(step, 5000) / 5000)
        self.fm = ConditionalFlowMatcher(sigma=0.0)
        self.forward = torch.compile(self.net) if setting["compile"] else self.net
        self.amp = setting["bf16"]
        self.gen = torch.Generator().manual_seed(SEED)

    def step(self) -> None:
        self.phases(lambda name: None)

    def phases(self, tick) -> None:
        self.optim.zero_grad()
        x1 = self.images[torch.randint(len(self.images), (self.batch,), generator=self.gen)].to(self.device) * 2 - 1
        x0 = torch.randn_like(x1)
        t, xt, ut = self.fm.sample_location_and_conditional_flow(x0, x1)
        tick("data + path")
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            vt = self.forward(t, xt)
            loss = torch.mean((vt.float() - ut) ** 2)
        tick("forward + loss")
        loss.backward()
        tick("backward")
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        tick("clip")
        self.optim.step()
        self.sched.step()
        tick("optimizer")
        if self.fm_loop:
            with torch.no_grad():
                torch._foreach_lerp_(self.elist, self.plist, 1 - 0.9999)
        else:
            example_ema(self.net, self.ema_model, 0.9999)
        tick("EMA")


# ---------------------------------------------------------------- building and timing


def build(kind: str, args, setting: dict, data_path: str, images: torch.Tensor, out: str):
    device = torch.device(args.device)
    if kind == "flowmatch":
        return FlowmatchStep(data_path, args.preset, args.batch, setting, device, out)
    if kind == "torchcfm":
        return TorchcfmStep(images, args.preset, args.batch, setting, device)
    if kind == "fm-heads64":
        return FlowmatchStep(data_path, args.preset, args.batch, setting, device, out, heads64=True)
    if kind == "fm-groups32":
        return FlowmatchStep(data_path, args.preset, args.batch, setting, device, out, groups32=True)
    if kind == "cfm-fmloop":
        return TorchcfmStep(images, args.preset, args.batch, setting, device, fm_loop=True)
    if kind == "torchcfm-example":  # the example as written: fp32, NCHW, eager
        return TorchcfmStep(images, args.preset, args.batch, parse_setting("fp32"), device)
    raise ValueError(kind)


def warm_up(stepper, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        stepper.step()
    sync(stepper.device)
    return time.perf_counter() - t0


def timed_rounds(steppers: dict, rounds: int, block: int, say) -> dict[str, list[float]]:
    """images/s of each stepper per round; the order rotates every round."""
    names, speeds = list(steppers), {k: [] for k in steppers}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            s = steppers[name]
            sync(s.device)
            t0 = time.perf_counter()
            for _ in range(block):
                s.step()
            sync(s.device)
            speeds[name].append(block * s.batch / (time.perf_counter() - t0))
        say(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {speeds[k][-1]:.1f}" for k in names) + " images/s")
    return speeds


def breakdown(steppers: dict, rounds: int, block: int) -> dict[str, dict[str, float]]:
    """Median ms per step of each phase, the steppers interleaved round by round."""
    per = {k: {} for k in steppers}
    for r in range(rounds):
        names = list(steppers)
        for name in names[r % len(names):] + names[:r % len(names)]:
            s = steppers[name]
            acc: dict[str, float] = {}
            sync(s.device)
            last = [time.perf_counter()]

            def tick(phase, s=s, acc=acc, last=last):
                sync(s.device)
                now = time.perf_counter()
                acc[phase] = acc.get(phase, 0.0) + now - last[0]
                last[0] = now

            for _ in range(block):
                s.phases(tick)
            for phase, sec in acc.items():
                per[name].setdefault(phase, []).append(1e3 * sec / block)
    return {k: {p: statistics.median(v) for p, v in ph.items()} for k, ph in per.items()}


def profile_ops(steppers: dict, steps: int, rows: int) -> dict[str, list[dict]]:
    """torch.profiler over ``steps`` whole steps of each stepper: the operators with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, s in steppers.items():
        gpu = s.device.type == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
            for _ in range(steps):
                s.step()
            sync(s.device)
        events = prof.key_averages()
        key = "self_device_time_total" if gpu else "self_cpu_time_total"
        total = sum(getattr(e, key) for e in events)
        top = sorted(events, key=lambda e: -getattr(e, key))[:rows]
        out[name] = [{"op": e.key, "calls_per_step": e.count / steps, "ms_per_step": getattr(e, key) / 1e3 / steps,
                      "share": getattr(e, key) / total} for e in top]
    return out


# ---------------------------------------------------------------- peak memory (a fresh process each)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set size: VmHWM, which starts afresh at exec (getrusage's
    ru_maxrss does not: a child started from a large parent inherits the parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_child(args) -> None:
    kind, name = args.child_memory
    setting = parse_setting(name)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data_path, images = make_data(tmp)
        stepper = build(kind, args, setting, data_path, images, os.path.join(tmp, "run"))
        before = rss_mb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.memory_steps):
            stepper.step()
        sync(device)
        peak = peak_rss_mb()
        out = {"peak_rss_mb": peak, "rss_before_mb": before, "rise_mb": peak - before}
        if device.type == "cuda":
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print("MEMORY " + json.dumps(out), flush=True)


def peak_memory(kind: str, name: str, argv_base: list[str]) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), *argv_base, "--child-memory", kind, name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[7:])
    print(f"  memory of {kind} {name}: the child failed ({proc.returncode}): {proc.stderr.strip()[-300:]}", file=sys.stderr)
    return None


# ---------------------------------------------------------------- data and report


def make_data(folder: str) -> tuple[str, torch.Tensor]:
    """The synthetic images both sides draw from: uniform in [0, 1], as a .npy for flowmatch's
    TrainConfig and as a tensor for torchcfm's loop."""
    x = np.random.default_rng(SEED).random((N_IMAGES, *SHAPE), dtype=np.float32)
    path = os.path.join(folder, "images.npy")
    np.save(path, x)
    return path, torch.from_numpy(x)


def machine_note(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), bf16 units: {'yes' if cpu_has_bf16() else 'no'}, "
            f"load average at start {load:.1f}")


def fmt_speed(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def fmt_mem(m: dict | None, device: torch.device) -> str:
    if m is None:
        return "n/a"
    if device.type == "cuda":
        return f"{m['cuda_peak_mb']:.0f}"
    return f"{m['peak_rss_mb']:.0f} (+{m['rise_mb']:.0f})"


def report(res: dict) -> str:
    device = torch.device(res["device"])
    mem_head = "peak MB" if device.type == "cuda" else "peak RSS MB (+rise)"
    lines = [f"\n{res['machine']}",
             f"preset {res['preset']}: flowmatch {res['params']['flowmatch'] / 1e6:.2f} M parameters, "
             f"torchcfm {res['params']['torchcfm'] / 1e6:.2f} M; batch {res['batch']} at 32x32x3; "
             f"{res['rounds']} rounds of {res['block']} steps, median images/s",
             "",
             f"| setting | flowmatch img/s | torchcfm img/s | ratio | vs torchcfm as written | flowmatch {mem_head} | "
             f"torchcfm {mem_head} |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in res["settings"].items():
        mem = row.get("memory", {})
        lines.append(f"| {name} | {fmt_speed(row['flowmatch'])} | {fmt_speed(row['torchcfm'])} | {row['ratio']:.2f}x | "
                     f"{row['vs_example']:.2f}x ({fmt_speed(row['torchcfm_example'])}) | "
                     f"{fmt_mem(mem.get('flowmatch'), device)} | {fmt_mem(mem.get('torchcfm'), device)} |")
    best = max(res["settings"], key=lambda k: res["settings"][k]["flowmatch"])
    lines.append(f"\nratio: flowmatch / torchcfm at the same setting; vs torchcfm as written: flowmatch at the setting / "
                 f"torchcfm's example as it is written (fp32, eager), timed in the same rotation (its images/s in "
                 f"brackets).\nfastest flowmatch setting: {best}, {fmt_speed(res['settings'][best]['flowmatch'])} images/s, "
                 f"{res['settings'][best]['vs_example']:.2f}x torchcfm's example as written")
    if res.get("levers"):
        lines += ["", f"levers at {res['lever_setting']} (timed in the same rotation):", "",
                  "| variant | img/s | vs its base |", "|---|---:|---:|"]
        for name, lv in res["levers"].items():
            lines.append(f"| {name} | {fmt_speed(lv['images_per_s'])} | {lv['vs_base']:.2f}x |")
    if res.get("breakdown"):
        bd = res["breakdown"]
        phases = list(next(iter(bd.values())))
        lines += ["", f"ms per step by phase at {res['lever_setting']} (median over rounds):", "",
                  "| phase | " + " | ".join(bd) + " |", "|---|" + "---:|" * len(bd)]
        for p in phases + ["total"]:
            vals = [sum(ph.values()) if p == "total" else ph[p] for ph in bd.values()]
            lines.append(f"| {p} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    for lib, ops in res.get("profile", {}).items():
        lines += ["", f"{lib}: operators with the most self time at {res['lever_setting']}", "",
                  "| operator | calls/step | ms/step | share |", "|---|---:|---:|---:|"]
        lines += [f"| {o['op'][:50]} | {o['calls_per_step']:.0f} | {o['ms_per_step']:.1f} | {o['share']:.1%} |" for o in ops]
    for name, row in res["settings"].items():
        if row.get("warmup_s"):
            lines.append(f"\nwarm-up at {name} ({res['warmup']} steps, compilation included): "
                         + ", ".join(f"{k} {v:.1f} s" for k, v in row["warmup_s"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--preset", choices=("small", "cifar"), help="the networks (default: small on the CPU, cifar on CUDA)")
    ap.add_argument("--batch", type=int, help="images per step (default: 32 on the CPU, 128 on CUDA)")
    ap.add_argument("--settings", help="comma list, e.g. fp32,channels-last,bf16+compile (default: what the device supports)")
    ap.add_argument("--warmup", type=int, help="untimed steps per stepper and setting (default: 3 on the CPU, 20 on CUDA)")
    ap.add_argument("--block", type=int, help="steps per timed block (default: 3 on the CPU, 20 on CUDA)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (each times every stepper once)")
    ap.add_argument("--levers", default=",".join(LEVERS), help=f"comma list of {', '.join(LEVERS)}, or none")
    ap.add_argument("--lever-setting", help="the setting the levers and the breakdown run at (default: bf16 on CUDA where "
                    "--settings has it, else the first of --settings)")
    ap.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True, help="per-phase ms at --lever-setting")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also profile STEPS steps of each library at --lever-setting (torch.profiler: the top operators)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="peak memory per library and setting")
    ap.add_argument("--memory-steps", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: 1 on the CPU, see below; 0: torch's own)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--child-memory", nargs=2, metavar=("KIND", "SETTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.device not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu or cuda, got {args.device!r}")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.preset = args.preset or ("cifar" if gpu else "small")
    args.batch = args.batch or (128 if gpu else 32)
    args.warmup = args.warmup if args.warmup is not None else (20 if gpu else 3)
    args.block = args.block or (20 if gpu else 3)
    if args.threads is None and not gpu:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        memory_child(args)
        return
    try:
        import torchcfm  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"torchcfm does not import ({e}); install the peers: bash benchmarks/install_peers.sh") from None
    names = args.settings.split(",") if args.settings else default_settings(device)
    settings = {n: parse_setting(n) for n in names}
    levers = [] if args.levers in ("", "none") else args.levers.split(",")
    lever_at = args.lever_setting or ("bf16" if gpu and "bf16" in settings else names[0])
    if lever_at not in settings:
        raise SystemExit(f"--lever-setting: {lever_at!r} is not one of --settings ({', '.join(names)})")
    if set(levers) - set(LEVERS):
        raise SystemExit(f"--levers: expected a comma list of {', '.join(LEVERS)}, or none")

    def say(msg):
        print(msg, file=sys.stderr, flush=True)

    res = {"device": args.device, "machine": machine_note(device), "preset": args.preset, "batch": args.batch,
           "rounds": args.rounds, "block": args.block, "warmup": args.warmup, "settings": {}, "levers": {}, "lever_setting": lever_at,
           "argv": sys.argv[1:]}
    base_argv = ["--device", args.device, "--preset", args.preset, "--batch", str(args.batch),
                 "--memory-steps", str(args.memory_steps)] + (["--threads", str(args.threads)] if args.threads else [])
    with tempfile.TemporaryDirectory() as tmp:
        data_path, images = make_data(tmp)
        for name, setting in settings.items():
            say(f"setting {name}")
            as_written, here = setting == parse_setting("fp32"), name == lever_at
            kinds = ["flowmatch", "torchcfm"] + (levers if here else []) + ([] if as_written else ["torchcfm-example"])
            steppers = {k: build(k, args, setting, data_path, images, os.path.join(tmp, f"run-{k}")) for k in kinds}
            res["params"] = {k: steppers[k].params for k in ("flowmatch", "torchcfm")}
            warm = {k: warm_up(s, args.warmup) for k, s in steppers.items()}
            speeds = timed_rounds(steppers, args.rounds, args.block, say)
            med = {k: statistics.median(v) for k, v in speeds.items()}
            row = {"flowmatch": med["flowmatch"], "torchcfm": med["torchcfm"], "ratio": med["flowmatch"] / med["torchcfm"],
                   "rounds": {k: speeds[k] for k in ("flowmatch", "torchcfm")},
                   "warmup_s": warm if setting["compile"] else {}}
            example = med["torchcfm"] if as_written else med["torchcfm-example"]
            row |= {"torchcfm_example": example, "vs_example": med["flowmatch"] / example}
            for k in levers if here else []:
                base = "flowmatch" if k.startswith("fm-") else "torchcfm"
                res["levers"][k] = {"images_per_s": med[k], "vs_base": med[k] / med[base], "rounds": speeds[k]}
            if here and args.breakdown:
                say("  per-phase breakdown")
                res["breakdown"] = breakdown({k: steppers[k] for k in ("flowmatch", "torchcfm")},
                                             max(3, args.rounds // 2), args.block)
            if here and args.profile:
                say("  profile")
                res["profile"] = profile_ops({k: steppers[k] for k in ("flowmatch", "torchcfm")}, args.profile, 12)
            res["settings"][name] = row
            del steppers
            if args.memory:
                say("  peak memory (fresh processes)")
                row["memory"] = {k: peak_memory(k, name, base_argv) for k in ("flowmatch", "torchcfm")}
    text = report(res)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
