"""Command line: `acq train | teacher | eval | demo`.

Bad input ends with one line on stderr ("acq: error: ...") and exit code 2; every check runs before
any output directory or file is created.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from .errors import AcqError

EXIT_USAGE = 2


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="digits_net (default) | resnet20 | any torchvision classification model "
                                   "(resnet18, mobilenet_v2, ...) | pytorchcv:NAME (e.g. pytorchcv:resnet20_cifar10); "
                                   "random weights unless --teacher-weights, never downloaded")
    p.add_argument("--image-size", type=int, help="input height = width (default: the model's / dataset's: "
                                                  "digits 16, CIFAR 32, else 224)")
    p.add_argument("--in-channels", type=int, help="input channels (default: the model's: digits_net 1, else 3)")
    p.add_argument("--dataset", help="evaluation data: digits | cifar10 | cifar100 | imagenet")
    p.add_argument("--num-classes", type=int, help="class count (default: the dataset's)")
    p.add_argument("--teacher-weights", help="state dict file of the FP teacher")
    p.add_argument("--data-dir", help="local dataset folder (torchvision layout; never downloaded)")
    p.add_argument("--device", help="cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--backend", help="acq_kernels backend: auto | reference | triton | cuda | cpu")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="acq", description="Data-free quantization with ACQ (and GDFQ).")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="quantize a teacher data-free (ACQ; --gdfq for the baseline)")
    t.add_argument("--config", help="JSON or TOML file of settings (flags override it)")
    _add_common(t)
    t.add_argument("--w-bits", type=int)
    t.add_argument("--a-bits", type=int)
    t.add_argument("--first-last-bits", type=int)
    t.add_argument("--ste", help="pure | clipped")
    t.add_argument("--weight-range", choices=("zero", "raw"),
                   help="per-channel weight range: zero = torch.ao's rule, includes 0 (default); raw = GDFQ's [min, max]")
    t.add_argument("--attention-layers", type=lambda s: [v for v in s.split(",") if v], metavar="NAME,NAME",
                   help="modules whose outputs are the attention layers S (default: each stage's output, "
                        "found from the traced graph)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--iters", dest="iters_per_epoch", type=int, help="iterations per epoch")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--warmup-epochs", type=int)
    t.add_argument("--range-epochs", type=int)
    t.add_argument("--lr-g", type=float)
    t.add_argument("--lr-q", type=float)
    t.add_argument("--q-milestones", type=lambda s: [int(v) for v in s.split(",") if v], help="e.g. 100,200,300")
    for name in ("lambda_ce", "beta_bns", "lambda_acm", "lambda_pair", "lambda_cons", "lambda_kd", "lambda_ce_q",
                 "lambda_at", "pair_margin", "kd_temperature", "center_range"):
        t.add_argument("--" + name.replace("_", "-"), type=float)
    t.add_argument("--kd-reduction", help="batchmean (correct) | mean (GDFQ's code)")
    t.add_argument("--gdfq", action="store_true", help="all ACQ terms off (the ablation baseline)")
    t.add_argument("--channels-last", action="store_true", default=None)
    t.add_argument("--precision", choices=("fp32", "bf16"),
                   help="bf16: forward passes under bf16 autocast (weights, gradients, optimizers stay fp32)")
    t.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="experimental, not yet run on a GPU: replay the main-phase step as one CUDA graph "
                        "(CUDA device, single process)")
    t.add_argument("--work-dir")
    t.add_argument("--keep-checkpoints", type=int)
    t.add_argument("--log-every", type=int)
    t.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                   help="checkpoint file or directory (no value: WORK_DIR/checkpoints)")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    # multi-process runs (torchrun --nproc_per_node=N -m acq train ...) and non-finite losses
    t.add_argument("--bns-stats", choices=("global", "local"),
                   help="under torchrun: match BN statistics of the global batch (default) or per rank")
    t.add_argument("--skip-nonfinite", action="store_true", default=None,
                   help="skip (and count) a step with a non-finite loss instead of stopping the run")

    te = sub.add_parser("teacher", help="train an FP teacher on local data (e.g. CIFAR-10)")
    _add_common(te)
    te.add_argument("--epochs", type=int, default=200)
    te.add_argument("--lr", type=float, default=0.1)
    te.add_argument("--batch-size", type=int, default=128)
    te.add_argument("--out", required=True, help="where to write the state dict")
    te.add_argument("--no-progress", dest="progress", action="store_false", default=True)

    ev = sub.add_parser("eval", help="accuracy of a teacher or of a quantized student checkpoint")
    _add_common(ev)
    ev.add_argument("--checkpoint", help="an acq train checkpoint (evaluates its quantized student)")
    ev.add_argument("--batch-size", type=int, default=256)

    d = sub.add_parser("demo", help="the embedded default: digits, FP vs naive vs GDFQ vs ACQ at W4A4 and W3A3")
    d.add_argument("--work-dir", default="runs/demo")
    d.add_argument("--cache-dir", help="where the digits teacher is cached (default ~/.cache/acq)")
    d.add_argument("--bits", nargs="+", default=["W4A4", "W3A3"], help="e.g. W4A4 W3A3 W2A4")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--backend", default="auto")
    d.add_argument("--epochs", type=int)
    d.add_argument("--iters", dest="iters_per_epoch", type=int)
    d.add_argument("--channels-last", action="store_true", default=None)
    d.add_argument("--precision", choices=("fp32", "bf16"), help="forward precision of the training loop")
    d.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster on a machine that is "
                                                "already busy: OpenMP workers spin-wait against other processes)")
    d.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    return ap


def _train_overrides(args) -> dict:
    skip = {"command", "config", "resume", "gdfq"}
    kw = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    if args.gdfq:
        kw.update(lambda_acm=0.0, lambda_pair=0.0, lambda_cons=0.0)
    return kw


def _teacher_for(cfg, progress=True):
    """The FP teacher of a config: the user's weights, the cached digits teacher, or torchvision's."""
    import torch
    from .models import build_model, load_teacher_weights

    if cfg.teacher_weights:
        model = build_model(cfg.model, cfg.classes)
        load_teacher_weights(model, cfg.teacher_weights, cfg.classes)
        return model
    if cfg.model == "digits_net" and cfg.dataset == "digits" and cfg.classes == 10:
        from .demo import default_cache_dir
        from .teacher import digits_teacher
        return digits_teacher(os.path.join(default_cache_dir(), f"digits_teacher_seed{cfg.seed}.pt"), cfg.seed,
                              progress=progress)[0]
    raise AcqError(f"model {cfg.model!r} needs --teacher-weights FILE (weights are never downloaded; "
                   "train one with `acq teacher`)")


DATASET_SHAPE = {"digits": (1, 16), "cifar10": (3, 32), "cifar100": (3, 32), "imagenet": (3, 224)}


def _eval_data(cfg):
    from .data import load_dataset
    if cfg.dataset == "digits" or cfg.data_dir:
        if DATASET_SHAPE.get(cfg.dataset, cfg.input_shape) != cfg.input_shape:
            c, s = DATASET_SHAPE[cfg.dataset]
            raise AcqError(f"the evaluation data ({cfg.dataset}: {c}x{s}x{s} images) does not fit the model's "
                           f"input {cfg.input_shape[0]}x{cfg.input_shape[1]}x{cfg.input_shape[1]}; pass the "
                           "teacher's --dataset (or matching --image-size / --in-channels)")
        return load_dataset(cfg.dataset, cfg.data_dir, train=False, seed=cfg.seed)
    return None


def cmd_train(args) -> int:
    import dataclasses

    from . import distributed
    from .config import make_config
    from .trainer import Trainer

    cfg = make_config(args.config, **_train_overrides(args))
    # --- torch.distributed: under torchrun (WORLD_SIZE > 1) join the group; rank 0 alone writes ---
    device = distributed.init_from_env(cfg.device)
    if device is None:
        return _train(args, cfg, Trainer)
    try:
        return _train(args, dataclasses.replace(cfg, device=device), distributed.DistributedTrainer)
    finally:
        distributed.shutdown()


def _train(args, cfg, trainer_cls) -> int:
    import acq_kernels
    from . import distributed

    main = distributed.is_main()
    acq_kernels.set_backend(cfg.backend)
    with distributed.main_first():  # rank 0 fills the teacher cache first
        teacher = _teacher_for(cfg, cfg.progress and main)
    data = _eval_data(cfg)
    trainer = trainer_cls(cfg, teacher, eval_data=data, out_dir=cfg.work_dir)
    if args.resume is not None:
        src = args.resume or os.path.join(cfg.work_dir, "checkpoints")
        file = trainer.resume(src)  # validated (readable, same config) before anything is written
        if main:
            print(f"acq: resumed from {file} at epoch {trainer.epoch}", file=sys.stderr)
    if main:
        os.makedirs(cfg.work_dir, exist_ok=True)
        with open(os.path.join(cfg.work_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
        from .quant import summary
        quantized = summary(trainer.student)
        with open(os.path.join(cfg.work_dir, "quantization.txt"), "w") as f:
            f.write(f"W{cfg.w_bits}A{cfg.a_bits} ({cfg.weight_range} weight ranges), attention layers: "
                    f"{', '.join(trainer.attention_nodes) or 'none'}\n{quantized}\n")
        print(f"acq: W{cfg.w_bits}A{cfg.a_bits}: {str(quantized).splitlines()[0]} quantized "
              f"(list: {os.path.join(cfg.work_dir, 'quantization.txt')})", file=sys.stderr)
    result = trainer.fit()
    if not main:
        return 0
    with open(os.path.join(cfg.work_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    if result["final_acc"] is not None:
        print(f"final accuracy {result['final_acc']:.2f}% (best {result['best']['acc']:.2f}% at epoch "
              f"{result['best']['epoch'] + 1})")
    return 0


def cmd_teacher(args) -> int:
    import torch
    from .checkpoint import atomic_save
    from .config import make_config
    from .data import evaluate, load_dataset
    from .teacher import train_teacher
    from .models import build_model

    cfg = make_config(**{k: getattr(args, k) for k in ("model", "dataset", "num_classes", "data_dir", "device",
                                                       "seed", "backend", "image_size", "in_channels") if getattr(args, k) is not None})
    if args.epochs < 1:
        raise AcqError(f"--epochs must be >= 1, got {args.epochs}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    train = load_dataset(cfg.dataset, cfg.data_dir, train=True, batch_size=args.batch_size, augment=True,
                         seed=cfg.seed)
    test = load_dataset(cfg.dataset, cfg.data_dir, train=False, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.classes)
    if cfg.dataset == "digits":
        from .teacher import _ShuffledDigits
        train = _ShuffledDigits(train.x, train.y, args.batch_size, cfg.seed)
    n_batches = -(-len(train.y) // args.batch_size) if hasattr(train, "y") else len(train)
    train_teacher(model, train, args.epochs, lr=args.lr, device=cfg.device, progress=args.progress,
                  per_epoch_batches=n_batches)
    acc = evaluate(model, test, cfg.device)
    os.makedirs(out_dir, exist_ok=True)
    atomic_save(model.cpu().state_dict(), args.out)
    print(f"teacher {cfg.model} on {cfg.dataset}: {acc:.2f}% test accuracy -> {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .checkpoint import load_checkpoint
    from .config import Config, make_config
    from .data import evaluate
    from .quant import quantize_model, set_observing

    if args.checkpoint:
        state, file = load_checkpoint(args.checkpoint)
        saved = {k: v for k, v in state["config"].items() if k not in Config.RESUMABLE_CHANGES or k == "epochs"}
        over = {k: getattr(args, k) for k in ("data_dir", "device", "backend") if getattr(args, k) is not None}
        cfg = make_config(**{**saved, **over})
    else:
        file = None
        cfg = make_config(**{k: getattr(args, k) for k in ("model", "dataset", "num_classes", "teacher_weights",
                                                           "data_dir", "device", "seed", "backend",
                                                           "image_size", "in_channels")
                             if getattr(args, k) is not None})
    import acq_kernels
    acq_kernels.set_backend(cfg.backend)
    data = _eval_data(cfg)
    if data is None:
        raise AcqError(f"dataset {cfg.dataset!r} needs --data-dir to evaluate")
    model = _teacher_for(cfg, progress=False)
    what = f"FP {cfg.model}"
    if file:
        model = quantize_model(model, cfg.w_bits, cfg.a_bits, cfg.first_last_bits, cfg.ste, cfg.act_momentum,
                               cfg.weight_range)
        model.load_state_dict(state["student"])
        set_observing(model, False)
        what = f"W{cfg.w_bits}A{cfg.a_bits} student of {file}"
    acc = evaluate(model.to(cfg.device), data, cfg.device)
    print(f"{what}: {acc:.2f}% top-1 on {cfg.dataset}")
    return 0


def _parse_bits(specs) -> list[tuple[int, int]]:
    out = []
    for s in specs:
        m = re.fullmatch(r"[wW](\d+)[aA](\d+)", s)
        if not m:
            raise AcqError(f"--bits entries look like W4A4, got {s!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def cmd_demo(args) -> int:
    from .demo import run_demo

    over = {k: getattr(args, k) for k in ("epochs", "iters_per_epoch", "channels_last", "precision")
            if getattr(args, k) is not None}
    if args.threads is not None:
        if args.threads < 1:
            raise AcqError(f"--threads must be >= 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    res = run_demo(args.work_dir, _parse_bits(args.bits), seed=args.seed, backend=args.backend,
                   cache_dir=args.cache_dir, progress=args.progress, **over)
    print(res["table"])
    print(f"results: {res['path']}; samples: "
          + ", ".join(r["samples_png"] for r in res["rows"] if "samples_png" in r))
    return 0


COMMANDS = {"train": cmd_train, "teacher": cmd_teacher, "eval": cmd_eval, "demo": cmd_demo}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import acq_kernels
    acq_kernels.tune_cpu_allocator()  # reuse freed CPU buffers instead of page-faulting new ones
    try:
        return COMMANDS[args.command](args)
    except AcqError as exc:
        print(f"acq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("acq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
