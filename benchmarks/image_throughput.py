"""Image training speed: flowmatch's ``Trainer.optimisation_step`` against the loop of torchcfm's
``examples/images/cifar10/train_cifar10.py`` (its UNet, Adam, python-loop EMA), side by side in one process on
the same synthetic 32x32x3 images, in blocks in rotating order (median images/s), and the peak memory of each
in a fresh process. Presets: ``cifar`` (35.7 M parameters each), ``small`` (the CPU default against a torchcfm
UNet of its pattern). Settings (fp32 or bf16, channels-last, compile) apply to both; "as written": torchcfm's
script as it runs (fp32, eager). One torch thread per process on the CPU.

    . .venv/bin/activate && bash benchmarks/install_peers.sh      # once: torchcfm, torch untouched
    python benchmarks/image_throughput.py --settings fp32,channels-last,bf16,bf16+channels-last --out runs/speed/cpu.json
    python benchmarks/image_throughput.py --device cuda --out runs/speed/gpu.json   # cifar preset, batch 128
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

N_IMAGES, SHAPE, SEED = 2048, (3, 32, 32), 0


def parse_setting(name: str) -> dict:
    parts = set(name.split("+"))
    if parts - {"fp32", "bf16", "channels-last", "compile"} or {"fp32", "bf16"} <= parts:
        raise SystemExit(f"--settings: {name!r}: expected parts fp32 or bf16, channels-last, compile joined by '+'")
    return {"bf16": "bf16" in parts, "channels_last": "channels-last" in parts, "compile": "compile" in parts}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_channels_last(model: torch.nn.Module) -> None:
    """NHWC weights, and the input made NHWC before the network sees it."""
    model.to(memory_format=torch.channels_last)

    def hook(module, args, kwargs):
        return tuple(a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.dim() == 4 else a
                     for a in args), kwargs

    model.register_forward_pre_hook(hook, with_kwargs=True)


def flowmatch_step(path: str, preset: str, batch: int, setting: dict, device: torch.device):
    """flowmatch's own Trainer on the .npy images: (``Trainer.optimisation_step``, parameter count)."""
    from accelerate import Accelerator

    from flowmatch.config import TrainConfig
    from flowmatch.training import Trainer

    cfg = TrainConfig(data=path, model="unet", unet=preset, batch_size=batch, lr=2e-4, warmup_steps=5000, schedule="constant",
                      grad_clip=1.0, ema_decay=0.9999, seed=SEED, steps=10**9, checkpoint_every=10**9, log_every=10**9, plots=False,
                      holdout=0.0, precision="bf16" if setting["bf16"] else "fp32", compile=setting["compile"])
    parts = cfg.build()
    if setting["channels_last"]:
        to_channels_last(parts.model)
    trainer = Trainer(cfg, parts, Accelerator(cpu=device.type == "cpu"), progress=False)
    trainer.prepare()  # what Trainer.run sets up before its loop
    return trainer.optimisation_step, sum(p.numel() for p in parts.model.parameters())


def torchcfm_step(images: torch.Tensor, preset: str, batch: int, setting: dict, device: torch.device):
    """One iteration of torchcfm's train_cifar10.py loop, and the parameter count."""
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    from torchcfm.models.unet.unet import UNetModelWrapper

    torch.manual_seed(SEED)
    if preset == "cifar":  # train_cifar10.py's network
        net = UNetModelWrapper(dim=SHAPE, num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2], num_heads=4,
                               num_head_channels=64, attention_resolutions="16", dropout=0.1).to(device)
    else:  # the small preset's pattern ("1": a factor a 4-level UNet never reaches, so the middle block only)
        net = UNetModelWrapper(dim=SHAPE, num_res_blocks=1, num_channels=32, channel_mult=[1, 2, 2, 4], num_heads=4,
                               num_head_channels=64, attention_resolutions="1", dropout=0.0).to(device)
    ema_model = copy.deepcopy(net)
    if setting["channels_last"]:
        to_channels_last(net)
        ema_model.to(memory_format=torch.channels_last)
    optim = torch.optim.Adam(net.parameters(), lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=lambda step: min(step, 5000) / 5000)
    fm, gen = ConditionalFlowMatcher(sigma=0.0), torch.Generator().manual_seed(SEED)
    forward = torch.compile(net) if setting["compile"] else net

    def step() -> None:
        optim.zero_grad()
        x1 = images[torch.randint(len(images), (batch,), generator=gen)].to(device) * 2 - 1
        t, xt, ut = fm.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting["bf16"]):
            loss = torch.mean((forward(t, xt).float() - ut) ** 2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optim.step()
        sched.step()
        source, target = net.state_dict(), ema_model.state_dict()  # utils_cifar.py's ema() as written
        for key in source:
            target[key].data.copy_(target[key].data * 0.9999 + source[key].data * (1 - 0.9999))

    return step, sum(p.numel() for p in net.parameters())


def build(kind: str, args, setting: str, tmp: str):
    """``kind``'s step at ``setting`` ("as written": torchcfm's at fp32) on the synthetic images in [0, 1]."""
    x, device = np.random.default_rng(SEED).random((N_IMAGES, *SHAPE), dtype=np.float32), torch.device(args.device)
    if kind == "flowmatch":
        np.save(f"{tmp}/images.npy", x)
        return flowmatch_step(f"{tmp}/images.npy", args.preset, args.batch, parse_setting(setting), device)
    return torchcfm_step(torch.from_numpy(x), args.preset, args.batch, parse_setting("fp32" if kind == "as written" else setting), device)


def timed(steps: dict, rounds: int, block: int, batch: int, device: torch.device) -> dict:
    """Per step function, images/s of each round; the order rotates every round."""
    names, out = list(steps), {k: [] for k in steps}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(block):
                steps[name]()
            sync(device)
            out[name].append(block * batch / (time.perf_counter() - t0))
    return out


def peak_memory(kind: str, setting: str, args) -> str:
    """Peak memory of 3 of ``kind``'s steps at ``setting`` in a fresh process (this script, --child)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--preset", args.preset, "--batch", str(args.batch),
           "--child", kind, setting]
    lines = [ln for ln in subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines() if ln.startswith("MEMORY ")]
    return lines[-1][7:] if lines else "n/a"


def child(kind: str, setting: str, args) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        (step, _), device = build(kind, args, setting, tmp), torch.device(args.device)
        with open("/proc/self/statm") as f:
            before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(3):
            step()
        sync(device)
        if device.type == "cuda":
            return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}"
        with open("/proc/self/status") as f:  # VmHWM starts afresh at exec
            peak = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
        return f"{peak:.0f} (+{peak - before:.0f})"


def main() -> None:
    from flowmatch.training import cpu_has_bf16

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=("small", "cifar"), help="the networks (default: small on the CPU, cifar on CUDA)")
    ap.add_argument("--batch", type=int, help="images per step (default: 32 on the CPU, 128 on CUDA)")
    ap.add_argument("--settings", help="comma list, e.g. fp32,channels-last,bf16+compile (default: what the device supports)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (each times every step once)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    gpu, device = args.device == "cuda", torch.device(args.device)
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    args.preset, args.batch = args.preset or ("cifar" if gpu else "small"), args.batch or (128 if gpu else 32)
    if not gpu:
        torch.set_num_threads(1)
    if args.child:
        print("MEMORY " + child(*args.child, args))
        return
    try:
        import torchcfm  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"torchcfm does not import ({e}); install the peers: bash benchmarks/install_peers.sh") from None
    bf16, block = torch.cuda.is_bf16_supported() if gpu else cpu_has_bf16(), 20 if gpu else 3
    more = ["bf16", "bf16+channels-last", "bf16+compile", "bf16+channels-last+compile"] if bf16 else ["compile"]
    names = args.settings.split(",") if args.settings else ["fp32", "channels-last", *(more if gpu else ["bf16"] * bf16)]
    res = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(), "bf16_units": bf16,
           "preset": args.preset, "batch": args.batch, "rounds": args.rounds, "block": block, "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"setting {name}", file=sys.stderr, flush=True)
            kinds = ["flowmatch", "torchcfm"] + ([] if parse_setting(name) == parse_setting("fp32") else ["as written"])
            built = {k: build(k, args, name, tmp) for k in kinds}
            res["params"] = {k: built[k][1] for k in ("flowmatch", "torchcfm")}
            steps = {k: step for k, (step, _) in built.items()}
            timed(steps, 1, block, args.batch, device)  # the warm-up (compilation happens here)
            rounds = timed(steps, args.rounds, block, args.batch, device)
            row = res["settings"][name] = {k: statistics.median(v) for k, v in rounds.items()} | {"rounds": rounds}
            row.setdefault("as written", row["torchcfm"])
            del built, steps
            row["memory"] = {k: peak_memory(k, name, args) for k in ("flowmatch", "torchcfm")}
    n_fm, n_cfm = res["params"]["flowmatch"] / 1e6, res["params"]["torchcfm"] / 1e6
    print(f"{args.device}, torch {torch.__version__}, {res['threads']} threads, bf16 units: {'yes' if bf16 else 'no'}; "
          f"preset {args.preset}: {n_fm:.2f} M parameters (torchcfm {n_cfm:.2f} M); batch {args.batch} at 32x32x3; "
          f"median images/s of {args.rounds} rounds of {block} steps\n")
    mem = "peak MB" if gpu else "peak RSS MB (+rise)"
    print(f"| setting | flowmatch img/s | torchcfm img/s | ratio | flowmatch / torchcfm as written (fp32) | flowmatch {mem} "
          f"| torchcfm {mem} |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, r in res["settings"].items():
        print(f"| {name} | {r['flowmatch']:.1f} | {r['torchcfm']:.1f} | {r['flowmatch'] / r['torchcfm']:.2f}x | "
              f"{r['flowmatch'] / r['as written']:.2f}x ({r['as written']:.1f}) | {r['memory']['flowmatch']} | {r['memory']['torchcfm']} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
