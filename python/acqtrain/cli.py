"""Command line: `acq train | teacher | eval | export | demo` (and `acq --version`).

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
    p.add_argument("--teacher-weights", help="state dict file of the FP teacher (default: none: the cached digits "
                                             "teacher for digits_net, torchvision's for resnet18/50)")
    p.add_argument("--data-dir", help="local dataset folder (torchvision layout; never downloaded)")
    p.add_argument("--device", help="cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, help="seed of every RNG and of the digits split")
    p.add_argument("--backend", help="acq_kernels backend: auto | reference | triton | cuda | cpu")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help text with the default of every option: given explicitly, or `(default: X)` appended."""


def _with_defaults(p: argparse.ArgumentParser, fallback: dict) -> argparse.ArgumentParser:
    """Append each option's default to its help: argparse's own default, else `fallback[dest]` (the
    Config default the option overrides); store_true flags read "default: off"."""
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._VersionAction)) or not a.option_strings:
            continue
        text = a.help or ""
        if "default" in text:
            continue
        if a.required:
            a.help = f"{text.replace(' (required)', '').replace('; required', '')} (required: no default)"
            continue
        if isinstance(a, argparse._StoreTrueAction):
            default = "off"
        elif isinstance(a, argparse._StoreFalseAction):
            default = "on"
        elif a.default is not None:
            default = "%(default)s"
        elif a.dest in fallback:
            v = fallback[a.dest]
            default = ",".join(map(str, v)) if isinstance(v, list) else ("none" if v is None else v)
        else:
            default = "none"
        a.help = f"{text} (default: {default})".strip()
    return p


def _version() -> str:
    import torch
    import acq_kernels
    from . import __version__
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "not installed"
    return (f"acq {__version__} (acq_kernels {acq_kernels.__version__}), torch {torch.__version__}, "
            f"triton {tv}, backend {acq_kernels.get_backend()}")


class _VersionInfo(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    import dataclasses
    from .config import Config
    cfg_defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in dataclasses.fields(Config)}
    ckpt_defaults = {k: f"the checkpoint's (else {'none' if v is None else v})" for k, v in cfg_defaults.items()}
    ap = argparse.ArgumentParser(prog="acq", description="Data-free quantization with ACQ (and GDFQ).")
    ap.add_argument("--version", action=_VersionInfo,
                    help="print the versions of acq, acq_kernels, torch and triton and the backend in force")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="quantize a teacher data-free (ACQ; --gdfq for the baseline)")
    t.add_argument("--config", help="JSON or TOML file of settings (flags override it)")
    _add_common(t)
    t.add_argument("--w-bits", type=int, help="weight bits (per output channel, asymmetric)")
    t.add_argument("--a-bits", type=int, help="activation bits (per tensor, asymmetric, EMA range)")
    t.add_argument("--first-last-bits", type=int, help="weight bits of the first and last weight layer in execution order "
                                                       "(none: --w-bits)")
    t.add_argument("--ste", help="straight-through estimator: pure | clipped")
    t.add_argument("--weight-range", choices=("zero", "raw"),
                   help="per-channel weight range: zero = torch.ao's rule, includes 0 (default); raw = GDFQ's [min, max]")
    t.add_argument("--attention-layers", type=lambda s: [v for v in s.split(",") if v], metavar="NAME,NAME",
                   help="modules whose outputs are the attention layers S (default: each stage's output, "
                        "found from the traced graph)")
    t.add_argument("--epochs", type=int, help="epochs in all, warm-up included")
    t.add_argument("--iters", dest="iters_per_epoch", type=int, help="iterations per epoch")
    t.add_argument("--batch-size", type=int, help="generated images per iteration")
    t.add_argument("--warmup-epochs", type=int, help="first epochs that train only the generator")
    t.add_argument("--range-epochs", type=int, help="first epochs that track activation ranges (then frozen)")
    t.add_argument("--lr-g", type=float, help="generator learning rate (Adam)")
    t.add_argument("--lr-q", type=float, help="student learning rate (SGD, Nesterov)")
    t.add_argument("--q-milestones", type=lambda s: [int(v) for v in s.split(",") if v],
                   help="epochs at which the student LR drops 10x, e.g. 100,200,300")
    loss_help = {"lambda_ce": "weight of the generator's cross-entropy", "beta_bns": "weight of the BN-statistics loss",
                 "lambda_acm": "weight of the attention-center matching loss (ACQ)",
                 "lambda_pair": "weight of the attention pair loss (ACQ)",
                 "lambda_cons": "weight of the eval/train-BN attention consistency loss (ACQ)",
                 "lambda_kd": "weight of the student's distillation loss",
                 "lambda_ce_q": "weight of the student's cross-entropy",
                 "lambda_at": "weight of the student's attention-transfer loss",
                 "pair_margin": "margin of the attention pair hinge", "kd_temperature": "distillation temperature",
                 "center_range": "attention centers are drawn from U[-r, r]^2"}
    for name, text in loss_help.items():
        t.add_argument("--" + name.replace("_", "-"), type=float, help=text)
    t.add_argument("--kd-reduction", help="batchmean (correct) | mean (GDFQ's code)")
    t.add_argument("--gdfq", action="store_true", help="all ACQ terms off (the ablation baseline)")
    t.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format")
    t.add_argument("--precision", choices=("fp32", "bf16"),
                   help="bf16: forward passes under bf16 autocast (weights, gradients, optimizers stay fp32)")
    t.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="experimental, not yet run on a GPU: replay the main-phase step as one CUDA graph "
                        "(CUDA device, single process)")
    t.add_argument("--work-dir", help="where config.json, metrics.jsonl, checkpoints/ and result.json go")
    t.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept")
    t.add_argument("--log-every", type=int, help="iterations between metrics records")
    t.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                   help="continue from a checkpoint file or directory (no value: WORK_DIR/checkpoints); without "
                        "--config the run's saved config.json is reused and flags override it (default: off)")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (one line per epoch is still printed; bars only show on a terminal) "
                        "(default: bars on)")
    # multi-process runs (torchrun --nproc_per_node=N -m acqtrain train ...) and non-finite losses
    t.add_argument("--bns-stats", choices=("global", "local"),
                   help="under torchrun: match BN statistics of the global batch (default) or per rank")
    t.add_argument("--skip-nonfinite", action="store_true", default=None,
                   help="skip (and count) a step with a non-finite loss instead of stopping the run")

    _with_defaults(t, cfg_defaults)

    te = sub.add_parser("teacher", help="train an FP teacher on local data (e.g. CIFAR-10)")
    _add_common(te)
    te.add_argument("--epochs", type=int, default=200, help="training epochs")
    te.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (cosine schedule)")
    te.add_argument("--batch-size", type=int, default=128, help="training batch size")
    te.add_argument("--out", required=True, help="where to write the state dict (required)")
    te.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                    help="no progress bar (default: a bar on a terminal)")
    _with_defaults(te, cfg_defaults)

    ev = sub.add_parser("eval", help="accuracy of a teacher, of a quantized student checkpoint or of an ONNX export")
    _add_common(ev)
    ev.add_argument("--checkpoint", help="an acq train checkpoint file or directory (evaluates its quantized "
                                         "student; its settings are the defaults of the other options)")
    ev.add_argument("--onnx", help="an exported model.onnx (evaluated with onnxruntime on --dataset)")
    ev.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    _with_defaults(ev, ckpt_defaults)

    ex = sub.add_parser("export", help="a trained student -> integer weights + qparams, plain-torch model, ONNX QDQ")
    ex.add_argument("--checkpoint", required=True, help="an acq train checkpoint file or directory (required)")
    ex.add_argument("--out", required=True, help="output directory (created; required)")
    ex.add_argument("--teacher-weights", help="teacher state dict file, overriding the path stored in the checkpoint")
    ex.add_argument("--data-dir", help="dataset folder, overriding the one stored in the checkpoint")
    ex.add_argument("--no-onnx", dest="onnx", action="store_false", default=True,
                    help="skip model.onnx (default: written and checked with onnxruntime)")
    ex.add_argument("--force", action="store_true",
                    help="export even a student that was never trained (checkpoint still in warm-up)")
    _with_defaults(ex, ckpt_defaults)

    from .config import demo_defaults
    demo_cfg = {**cfg_defaults, **demo_defaults()}
    d = sub.add_parser("demo", help="the embedded default: digits, FP vs naive vs GDFQ vs ACQ at W4A4 and W3A3")
    d.add_argument("--work-dir", default="runs/demo", help="where each run and results.json go")
    d.add_argument("--cache-dir", help="where the digits teacher is cached (default: $XDG_CACHE_HOME/acq or "
                                       "~/.cache/acq)")
    d.add_argument("--bits", nargs="+", default=["W4A4", "W3A3"], help="bit settings, e.g. W4A4 W3A3 W2A4")
    d.add_argument("--seed", type=int, default=0, help="seed of the teacher, the split and every run")
    d.add_argument("--backend", default="auto", help="acq_kernels backend: auto | reference | triton | cuda | cpu")
    d.add_argument("--epochs", type=int, help="epochs per run (must exceed the 1 warm-up epoch)")
    d.add_argument("--iters", dest="iters_per_epoch", type=int, help="iterations per epoch")
    d.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format")
    d.add_argument("--precision", choices=("fp32", "bf16"), help="forward precision of the training loop")
    d.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster on a machine that is "
                                                "already busy: OpenMP workers spin-wait against other processes)")
    d.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bars (stage results are still printed) (default: bars on a terminal)")
    d.add_argument("--no-export", dest="export", action="store_false", default=True,
                   help="do not export the ACQ students (default: exported and evaluated with onnxruntime when "
                        "the [export] extra is installed)")
    _with_defaults(d, {**demo_cfg, "threads": "torch's"})
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


def _eval_data(cfg, batch_size: int = 256):
    from .data import image_shape, load_dataset
    if cfg.dataset == "digits" or cfg.data_dir:
        if image_shape(cfg.dataset) != tuple(cfg.input_shape):
            c, s = image_shape(cfg.dataset)
            raise AcqError(f"the evaluation data ({cfg.dataset}: {c}x{s}x{s} images) does not fit the model's "
                           f"input {cfg.input_shape[0]}x{cfg.input_shape[1]}x{cfg.input_shape[1]}; pass the "
                           "teacher's --dataset (or matching --image-size / --in-channels)")
        return load_dataset(cfg.dataset, cfg.data_dir, train=False, batch_size=batch_size, seed=cfg.seed)
    return None


def _saved_run_config(args) -> dict | None:
    """The settings a resumed run starts from when no --config is given: WORK_DIR/config.json (the work dir
    given, or the one holding the --resume checkpoint), else the config stored in the checkpoint."""
    import dataclasses
    from .checkpoint import load_checkpoint
    from .config import Config
    candidates = []
    if args.work_dir:
        candidates.append(os.path.join(args.work_dir, "config.json"))
    if args.resume:
        src = os.path.abspath(args.resume)
        d = src if os.path.isdir(src) else os.path.dirname(src)
        candidates += [os.path.join(d, "config.json"), os.path.join(os.path.dirname(d), "config.json")]
    elif not args.work_dir:
        candidates.append(os.path.join(Config.work_dir, "config.json"))
    fields = {f.name for f in dataclasses.fields(Config)}
    for path in candidates:
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    saved = json.load(f)
            except (OSError, ValueError) as exc:
                raise AcqError(f"cannot read the saved run config {path}: {exc}") from None
            return {k: v for k, v in saved.items() if k in fields}
    src = args.resume or os.path.join(args.work_dir or Config.work_dir, "checkpoints")
    state, _ = load_checkpoint(src)
    return {k: v for k, v in state.get("config", {}).items() if k in fields}


def make_config(*args, **kwargs):
    """A command's Config: validated, and its model must fit its dataset (checked before any work)."""
    from .config import make_config as _make_config
    return _make_config(*args, **kwargs).check_dataset_fit()


def _train_config(args):
    """Defaults < --config file (or, resuming without one, the run's saved config) < command-line flags."""
    import dataclasses
    overrides = _train_overrides(args)
    if args.resume is not None and args.config is None:
        cfg = make_config(**{**_saved_run_config(args), **overrides})
    else:
        cfg = make_config(args.config, **overrides)
    if cfg.teacher_weights:  # stored absolute: eval / resume / export work from any folder
        cfg = dataclasses.replace(cfg, teacher_weights=os.path.abspath(cfg.teacher_weights))
    return cfg


def cmd_train(args) -> int:
    import dataclasses

    from . import distributed
    from .console import warn
    from .paths import check_output_dir
    from .trainer import Trainer

    cfg = _train_config(args)
    check_output_dir(cfg.work_dir, "--work-dir")
    for w in cfg.warnings():
        warn(w)
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
    from .data import evaluate, load_dataset
    from .teacher import train_teacher
    from .models import build_model

    cfg = make_config(**{k: getattr(args, k) for k in ("model", "dataset", "num_classes", "data_dir", "device",
                                                       "seed", "backend", "image_size", "in_channels") if getattr(args, k) is not None})
    if args.epochs < 1:
        raise AcqError(f"--epochs must be >= 1, got {args.epochs}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out):
        raise AcqError(f"--out {args.out} is a directory; give the state dict's file name")
    from .paths import check_output_dir
    check_output_dir(out_dir, "--out")
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


def _checkpoint_config(args):
    """(state, file, config) of --checkpoint; --teacher-weights / --data-dir / --device / --backend override it."""
    from .checkpoint import load_checkpoint
    from .config import Config
    state, file = load_checkpoint(args.checkpoint)
    if not isinstance(state.get("config"), dict) or "student" not in state:
        raise AcqError(f"{file} is not an acq train checkpoint (no config / student)")
    saved = {k: v for k, v in state["config"].items() if k not in Config.RESUMABLE_CHANGES or k == "epochs"}
    over = {k: getattr(args, k, None) for k in ("teacher_weights", "data_dir", "device", "backend")}
    over = {k: v for k, v in over.items() if v is not None}
    if "teacher_weights" in over:
        over["teacher_weights"] = os.path.abspath(over["teacher_weights"])
    try:
        cfg = make_config(**{**saved, **over})
    except AcqError as exc:
        if "teacher weights file not found" in str(exc) and "teacher_weights" not in over:
            raise AcqError(f"{exc} (stored in {file}; pass --teacher-weights FILE to point at it)") from None
        raise
    return state, file, cfg


def _student_of(state, file, cfg):
    """The quantized student of a checkpoint, ranges frozen, built on its config's teacher."""
    from .console import warn
    from .export import state_sha256
    from .quant import quantize_model, set_observing
    teacher = _teacher_for(cfg, progress=False)
    saved_hash = state.get("teacher_sha256")
    if saved_hash is not None and saved_hash != state_sha256(teacher):
        warn(f"teacher {cfg.teacher_weights or cfg.model} is not the one {file} was trained from "
             "(the student's own weights are used; only the architecture comes from the teacher)")
    model = quantize_model(teacher, cfg.w_bits, cfg.a_bits, cfg.first_last_bits, cfg.ste, cfg.act_momentum,
                           cfg.weight_range)
    try:
        model.load_state_dict(state["student"])
    except RuntimeError as exc:
        raise AcqError(f"the student in {file} does not fit model {cfg.model!r}: "
                       f"{str(exc).splitlines()[-1].strip()[:300]}") from None
    set_observing(model, False)
    return model


def _input_shape(cfg) -> tuple[int, int, int]:
    channels, size = cfg.input_shape
    return channels, size, size


def _eval_onnx(args) -> int:
    from .data import CHANNELS, image_shape
    from .export import onnx_session, onnx_run
    for flag in ("checkpoint", "model", "teacher_weights", "num_classes"):
        if getattr(args, flag) is not None:
            raise AcqError(f"--onnx evaluates the ONNX file alone; --{flag.replace('_', '-')} does not apply")
    if not os.path.isfile(args.onnx):
        raise AcqError(f"ONNX file not found: {args.onnx}")
    import types
    from .data import check_dataset
    cfg = types.SimpleNamespace(dataset=check_dataset(args.dataset or "digits"), data_dir=args.data_dir,
                                seed=0 if args.seed is None else args.seed)
    if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
        raise AcqError(f"data dir not found: {cfg.data_dir}")
    if args.batch_size < 1:
        raise AcqError(f"--batch-size must be >= 1, got {args.batch_size}")
    session = onnx_session(args.onnx)
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != CHANNELS[cfg.dataset]):
        raise AcqError(f"{args.onnx} takes input {shape} but dataset {cfg.dataset!r} has "
                       f"{CHANNELS[cfg.dataset]}-channel images")
    c, size = image_shape(cfg.dataset)
    if any(isinstance(d, int) and d != size for d in shape[2:]):
        raise AcqError(f"{args.onnx} takes input {shape} but dataset {cfg.dataset!r} has {size}x{size} images")
    cfg.input_shape = (c, size)
    data = _eval_data(cfg, args.batch_size)
    if data is None:
        raise AcqError(f"dataset {cfg.dataset!r} needs --data-dir to evaluate")
    correct = total = 0
    for x, y in data:
        correct += (onnx_run(session, x).argmax(1) == y).sum().item()
        total += len(y)
    print(f"ONNX {args.onnx} (onnxruntime): {100.0 * correct / max(total, 1):.2f}% top-1 on {cfg.dataset}")
    return 0


def cmd_eval(args) -> int:
    from .data import evaluate

    if args.onnx:
        return _eval_onnx(args)
    if args.batch_size < 1:
        raise AcqError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.checkpoint:
        state, file, cfg = _checkpoint_config(args)
    else:
        file = None
        cfg = make_config(**{k: getattr(args, k) for k in ("model", "dataset", "num_classes", "teacher_weights",
                                                           "data_dir", "device", "seed", "backend",
                                                           "image_size", "in_channels")
                             if getattr(args, k) is not None})
    import acq_kernels
    acq_kernels.set_backend(cfg.backend)
    data = _eval_data(cfg, args.batch_size)
    if data is None:
        raise AcqError(f"dataset {cfg.dataset!r} needs --data-dir to evaluate")
    if file:
        model = _student_of(state, file, cfg)
        what = f"W{cfg.w_bits}A{cfg.a_bits} student of {file}"
    else:
        model = _teacher_for(cfg, progress=False)
        what = f"FP {cfg.model}"
    acc = evaluate(model.to(cfg.device), data, cfg.device)
    print(f"{what}: {acc:.2f}% top-1 on {cfg.dataset}")
    return 0


def cmd_export(args) -> int:
    from .console import warn
    from .export import export_student, require_export_deps
    from .paths import check_output_dir

    require_export_deps(args.onnx)
    check_output_dir(args.out, "--out")
    state, file, cfg = _checkpoint_config(args)
    trained = state.get("epoch", 0) - cfg.warmup_epochs
    if trained <= 0:
        msg = (f"the student in {file} was never trained (checkpoint at epoch {state.get('epoch', 0)}, "
               f"warm-up is {cfg.warmup_epochs} epochs)")
        if not args.force:
            raise AcqError(f"{msg}; pass --force to export it anyway")
        warn(msg)
    import acq_kernels
    acq_kernels.set_backend(cfg.backend)
    student = _student_of(state, file, cfg)
    from . import __version__
    meta = {"model": cfg.model, "dataset": cfg.dataset, "num_classes": cfg.classes, "w_bits": cfg.w_bits,
            "a_bits": cfg.a_bits, "first_last_bits": cfg.first_last_bits,
            "teacher": {"weights": cfg.teacher_weights, "sha256": state.get("teacher_sha256")},
            "checkpoint": {"file": os.path.abspath(file), "epoch": state.get("epoch"),
                           "trained_epochs": max(trained, 0)}}
    manifest = export_student(student, args.out, _input_shape(cfg), meta, onnx=args.onnx)
    print(f"exported W{cfg.w_bits}A{cfg.a_bits} {cfg.model} student of {file} -> {args.out}: "
          f"{len(manifest['weight_layers'])} integer weight layers, {len(manifest['activation_sites'])} "
          f"activation sites" + (f", model.onnx (opset {manifest['onnx']['opset']})" if args.onnx else ""))
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
                   cache_dir=args.cache_dir, progress=args.progress, export=args.export, **over)
    print(res["table"])
    print(f"results: {res['path']}; samples: "
          + ", ".join(r["samples_png"] for r in res["rows"] if "samples_png" in r))
    return 0


COMMANDS = {"train": cmd_train, "teacher": cmd_teacher, "eval": cmd_eval, "export": cmd_export, "demo": cmd_demo}


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
