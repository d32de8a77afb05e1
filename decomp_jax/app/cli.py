"""``decomp-jax``: train | eval | merge | export | import | methods | sweep | report | bench | convert."""

from __future__ import annotations

import argparse
import json
import os
import sys

from decomp_jax.errors import ConfigError
from decomp_jax.parallel.distributed import HEARTBEAT_TIMEOUT, INIT_TIMEOUT


def _train(args) -> int:
    from decomp_jax.parallel import distributed
    from decomp_jax.app.experiment import load_config, run

    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if len(args.config) > 1 or args.seeds:  # seeds of one experiment, trained together
        return _train_seeds(args, overrides)
    cfg = load_config(args.config[0], overrides)  # a bad config fails before any process waits for the others
    given = distributed.settings(args.coordinator, args.num_processes, args.process_id)
    if (given or args.distributed) and not os.environ.get(distributed.CHILD_ENV):
        # several processes: train in a child, and name the process that died if the job fails
        return distributed.supervise(args.argv, cfg.train.output_dir, given["process_id"] if given else None)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed,
                           init_timeout=args.init_timeout, heartbeat_timeout=args.heartbeat_timeout)
    try:
        record = run(cfg, progress=not args.no_progress, resume=args.resume)
    except KeyboardInterrupt:
        print(f"decomp-jax: {_stopped(cfg.train.output_dir, args)}", file=sys.stderr)
        return 130
    if distributed.is_primary():
        print(json.dumps(record, indent=2))
        print(f"wrote {cfg.train.output_dir}/metrics.json")
    return 0


def _stopped(output_dir: str, args) -> str:
    """What an interrupted ``train`` says: where its last checkpoint is and how to continue."""
    folder = os.path.join(output_dir, "checkpoints")
    steps = sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []
    how = "Ctrl-C" if args.signal is None else args.signal
    if not steps:
        return (f"stopped ({how}) before the first checkpoint (train.save_every sets how often one is written); "
                f"run the same command again to start over.")
    return (f"stopped ({how}); the last checkpoint is step {steps[-1]} in {folder}; continue with `decomp-jax train "
            f"{os.path.join(output_dir, 'config.yaml')} --resume`.")


def _train_seeds(args, overrides) -> int:
    """``train C_1 ... C_N`` or ``train CONFIG --seeds S_1 ... S_N``: the seeds in one batched step."""
    from decomp_jax.parallel import distributed
    from decomp_jax.app.experiment import load_config, run_seeds

    many = distributed.settings(args.coordinator, args.num_processes, args.process_id) or args.distributed
    given = [flag for flag, on in (("--resume", args.resume), ("several processes", many),
                                   ("--output-dir with several configs", args.output_dir and len(args.config) > 1)) if on]
    if given:
        raise ConfigError(f"{', '.join(given)}: several seeds train together in one process, each in its own "
                          f"train.output_dir; resume a stopped one alone with `decomp-jax train ITS_FOLDER/config.yaml "
                          f"--resume`.")
    if args.seeds and len(args.config) > 1:
        raise ConfigError("--seeds takes one config (each seed trains in OUTPUT_DIR/seed<S>); drop it to train the "
                          "given configs together.")
    if args.seeds:  # one config: each seed in a folder of its own under train.output_dir
        base = load_config(args.config[0], overrides).train.output_dir
        cfgs = [load_config(args.config[0], overrides + [f"train.seed={s}", f"train.output_dir={base}/seed{s}"])
                for s in args.seeds]
    else:
        cfgs = [load_config(path, overrides) for path in args.config]
    try:
        records = run_seeds(cfgs, progress=not args.no_progress)
    except KeyboardInterrupt:
        for cfg in cfgs:
            print(f"decomp-jax: {cfg.train.output_dir}: {_stopped(cfg.train.output_dir, args)}", file=sys.stderr)
        return 130
    for cfg, record in zip(cfgs, records):
        print(f"seed {cfg.train.seed}: {json.dumps(record['eval'])} -> {cfg.train.output_dir}")
    return 0


def _eval(args) -> int:
    from decomp_jax.app.experiment import evaluate_run

    print(json.dumps(evaluate_run(args.run_dir, args.set or []), indent=2))
    return 0


def _methods(args) -> int:
    from decomp_jax.core import methods

    names = methods.names(None)  # per-layer methods, then the prompt methods (decoders only)
    counts, backbone = {}, None
    if args.paper_budgets:
        if args.config:
            raise ConfigError("--paper-budgets counts on RoBERTa-base at the paper's placements; drop the config.")
        return _paper_budgets(args.rank)
    if args.config:
        from decomp_jax.app.experiment import method_param_counts

        counts, backbone, cfg = method_param_counts(args.config, args.set or [])
        print(f"model {cfg.model.name} ({backbone:,} parameters); targets {cfg.adapter.targets!r}, rank {cfg.adapter.rank}"
              + (f", also training {cfg.adapter.train_extra!r}" if cfg.adapter.train_extra else ""))
    width = max(len(n) for n in names)
    header = f"{'method':<{width}}  {'family':<14}  " + (f"{'trainable':>10}  {'‰ backbone':>10}  " if counts else "")
    print(header + "notes        formula")
    for name in names:
        m = methods.get(name)
        notes = ",".join(t for t, on in (("stateful", m.schedule is not None), ("no-merge", not m.mergeable)) if on)
        row = f"{name:<{width}}  {m.family:<14}  "
        if counts and name in counts:
            row += f"{counts[name]:>10,}  {1000 * counts[name] / backbone:>9.3f}‰  "
        elif counts:  # prompt methods on an encoder: they need our Llama
            row += f"{'-':>10}  {'-':>10}  "
        print(row + f"{notes:<11}  {m.formula}")
    return 0


def _paper_budgets(rank: int) -> int:
    from decomp_jax.app.sweep import PAPER_BACKBONE, paper_budgets

    rows = paper_budgets(rank)
    print(f"RoBERTa-base (transformers' RobertaConfig(), shapes only; {rows[0]['backbone']:,} parameters), budgets "
          f"per mille of the paper's {PAPER_BACKBONE / 1e6:.0f}M; rank {rank} where a method has one")
    width = max(len(r["method"]) for r in rows)
    print(f"{'method':<{width}}  {'placement':<24}  {'trainable':>10}  {'per mille':>9}  paper")
    for r in rows:
        paper = "" if r["paper_per_mille"] is None else f"{r['paper_per_mille']:.2f}"
        print(f"{r['method']:<{width}}  {r['placement']:<24}  {r['trainable']:>10,}  {r['per_mille']:>9.2f}  {paper}")
    return 0


def _sweep(args) -> int:
    from decomp_jax.app import sweep as study

    spec = study.load_study(args.study, args.output_dir)
    if args.dry_run:
        cells = study.expand(spec)
        i, n = study.parse_shard(args.shard)
        mine = study.shard_cells(cells, (i, n), args.batch_seeds)
        status = {c.id: study.cell_status(spec.output_dir, c) for c in cells}
        together = {}  # --batch-seeds: the pending seeds that one process trains together
        if args.batch_seeds:
            units = study.sweep_units([c for c in mine if status[c.id] != "done"], status, True)
            together = {c.id: k for k, unit in enumerate(u for u in units if len(u) > 1) for c in unit}
        for c in mine:
            print(f"{c.id}  [{status[c.id]}]" + (f"  together #{together[c.id]}" if c.id in together else ""))
        counts = {s: sum(v == s for v in status.values()) for s in ("done", "partial", "failed", "pending")}
        print(f"{len(mine)} of {len(cells)} cells in shard {i}/{n}; the whole grid: " +
              ", ".join(f"{v} {k}" for k, v in counts.items()) + f"; output {spec.output_dir}")
        return 0
    try:
        result = study.sweep(spec, workers=args.workers, shard=study.parse_shard(args.shard), batch_seeds=args.batch_seeds)
    except KeyboardInterrupt:  # Ctrl-C or a scheduler's SIGTERM: the sweep said what it stopped; no traceback
        return 130
    print(f"report: decomp-jax report {spec.output_dir}")
    return 1 if result["failed"] else 0


def _report(args) -> int:
    from decomp_jax.app import sweep as study

    pairs = [tuple(p.split(":")) for p in args.pair] if args.pair else None
    if pairs and any(len(p) != 2 for p in pairs):
        raise ConfigError("--pair takes A:B (e.g. --pair lora+mpc_o:lora).")
    paths = study.report(args.study_dir, args.out, pairs)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _merge(args) -> int:
    from decomp_jax.guards import check_output_folder, manifest_files
    from decomp_jax.app.runs import MERGE_MANIFEST, export_merged, restore_run

    check_output_folder(args.out, ours=lambda d: manifest_files(d, MERGE_MANIFEST), overwrite=args.overwrite,
                        writer="merge")  # before the model loads
    info = export_merged(restore_run(args.checkpoint), args.out, overwrite=args.overwrite)
    print(json.dumps(info, indent=2))
    print(f"wrote {args.out} ({', '.join(sorted(os.listdir(args.out)))})")
    return 0


def _export(args) -> int:
    from decomp_jax.guards import check_output_folder
    from decomp_jax.interop.peft import export_entries
    from decomp_jax.app.runs import export_peft_run, restore_run

    check_output_folder(args.out, ours=export_entries, overwrite=args.overwrite, writer="export")  # before the model loads
    info = export_peft_run(restore_run(args.checkpoint), args.out, overwrite=args.overwrite,
                           base_model_id=args.base_model_id)
    print(json.dumps(info, indent=2))
    print(f"wrote {args.out} (adapter_config.json, adapter_model.safetensors)")
    return 0


def _import(args) -> int:
    from decomp_jax.app.runs import import_peft_run

    print(json.dumps(import_peft_run(args.peft_dir, args.config, args.out, args.set or [], subfolder=args.subfolder),
                     indent=2))
    print(f"wrote {args.out}: evaluate with `decomp-jax eval {args.out}`")
    return 0


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated command-line list (``--models a,b``)."""
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _bench_decoder(args) -> int:
    from decomp_jax.app import bench_decoder as bd

    given = [flag for flag, on in (("--quick", args.quick), ("--warmup", args.warmup is not None),
                                   ("--backbone", args.backbone), ("--no-merged", args.no_merged)) if on]
    if given:
        raise ConfigError(f"{', '.join(given)}: not for --decoder (its timed steps are --rounds x --steps; "
                          f"it has no merged mode and runs our Llama).")
    changes: dict = {}
    if args.models:
        changes["models"] = _names(args.models)
        unknown = [m for m in changes["models"] if m not in bd.MODELS]
        if unknown:
            raise ConfigError(f"--models: unknown decoder models {unknown}; choose from {list(bd.MODELS)}.")
    if args.methods:
        changes["methods"] = tuple(m for m in _names(args.methods) if m != "full")
        changes["peft_methods"] = tuple(m for m in changes["methods"] if m in bd.PEFT_METHODS)
        changes["torch_scored"] = tuple(m for m in ("full", "lora") if m == "full" or m in changes["methods"])
    if args.batch_size is not None or args.seq_len is not None:
        defaults = bd.DecoderBenchConfig().shapes
        changes["shapes"] = {m: (args.batch_size or b, args.seq_len or n) for m, (b, n) in defaults.items()}
    for name in ("rounds", "steps"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.decoder_layers is not None:
        changes["llama_1b_layers"] = args.decoder_layers
    if args.no_peft:
        changes["torch"] = False
    if args.no_generation:
        changes["generation"] = False
    return _bench_report(bd, lambda: bd.run_decoder_bench(bd.DecoderBenchConfig(**changes)), args.out)


def _bench_long(args) -> int:
    from decomp_jax.app import bench_long as bl

    given = [flag for flag, on in (("--quick", args.quick), ("--models", args.models),  # (--decoder: it is one)
                                   ("--methods", args.methods), ("--seq-len", args.seq_len is not None),
                                   ("--batch-size", args.batch_size is not None), ("--rounds", args.rounds is not None),
                                   ("--decoder-layers", args.decoder_layers is not None),
                                   ("--no-generation", args.no_generation)) if on]
    if given:
        raise ConfigError(f"{', '.join(given)}: not for --long (it measures SmolLM2's LoRA step at --lengths, "
                          f"e.g. --lengths 512,1024,2048,4096, and packing on the commonsense CPU config).")
    changes: dict = {}
    if args.lengths:
        try:
            changes["lengths"] = tuple(int(x) for x in _names(args.lengths))
        except ValueError as err:
            raise ConfigError(f"--lengths {args.lengths!r}: comma-separated token counts, e.g. 512,1024,2048,4096.") from err
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.no_packing:
        changes["packing"] = False
    if args.no_sweep:
        if args.lengths:
            raise ConfigError("--no-sweep and --lengths: --lengths sets the sweep's lengths; give one or the other.")
        if args.no_packing:
            raise ConfigError("--no-sweep and --no-packing: that leaves nothing to measure; give one of them.")
        changes["lengths"] = ()
    return _bench_report(bl, lambda: bl.run_long_bench(bl.LongBenchConfig(**changes)), args.out)


def _bench_report(module, run, out: str) -> int:
    """Run a benchmark (``run()``), write its files with ``module.write_outputs`` and print its targets."""
    try:
        result = run()
    except ValueError as err:
        raise ConfigError(str(err)) from err
    paths = module.write_outputs(result, out)
    print("\ntargets:")
    print("\n".join(module.format_targets(result["targets"])))
    meta = result["meta"]
    load = meta["load_avg_1min_start"], meta["load_avg_1min_end"]
    print(f"\nwall {meta['wall_s']:.0f} s" + (f"; 1-min load average {load[0]:.2f} at the start, {load[1]:.2f} at the end"
                                             if None not in load else ""))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _bench(args) -> int:
    from decomp_jax.app import bench

    if args.long:
        return _bench_long(args)
    if args.lengths or args.no_packing or args.no_sweep:
        raise ConfigError("--lengths, --no-sweep and --no-packing apply to --long only.")
    if args.decoder:
        return _bench_decoder(args)
    if args.rounds is not None or args.decoder_layers is not None or args.no_generation:
        raise ConfigError("--rounds, --decoder-layers and --no-generation apply to --decoder only.")
    changes = {}
    if args.models:
        changes["models"] = _names(args.models)
    if args.methods:
        changes["methods"] = _names(args.methods)
    for name in ("batch_size", "seq_len", "warmup", "steps"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.backbone:
        changes["backbone"] = args.backbone
    if args.no_peft:
        changes["peft"] = False
    if args.no_merged:
        changes["merged"] = ()
    if args.steps is not None or args.warmup is not None:  # the same counts for every model
        changes["model_steps"] = {}
    unknown = [m for m in changes.get("models", ()) if m not in bench.MODELS]
    if unknown:
        raise ConfigError(f"--models: unknown {unknown}; choose from {list(bench.MODELS)}.")
    config = bench.BenchConfig.quick_config(**changes) if args.quick else bench.BenchConfig(**changes)
    return _bench_report(bench, lambda: bench.run_bench(config), args.out)


def _convert(args) -> int:
    from decomp_jax.models.convert import convert

    print(json.dumps(convert(args.src, args.out, overwrite=args.overwrite), indent=2))
    print(f"wrote {args.out} (config.json, model.safetensors, tokenizer files)")
    return 0


OVERWRITE_HELP = ("write into --out although it holds files this command did not write (files of the same names are "
                  "replaced, the others kept); without it such a folder is refused and an earlier output of this "
                  "command is replaced whole")


def build_parser() -> argparse.ArgumentParser:
    """The ``decomp-jax`` parser: ``--debug`` and the subcommands, each with its flags."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error (default: one line)")
    parser = argparse.ArgumentParser(prog="decomp-jax", description="Parameter-efficient fine-tuning in JAX/Flax.",
                                     parents=[common])
    from decomp_jax.version import VERSION

    parser.add_argument("--version", action="version", version=f"decomp-jax {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:  # every command takes --debug too
        return sub.add_parser(name, parents=[common], **kwargs)

    for add_command in (_add_train, _add_eval, _add_merge, _add_export, _add_import, _add_methods, _add_sweep,
                        _add_report, _add_bench, _add_convert):
        add_command(add)
    return parser


def _add_train(add) -> None:
    """``train``: fine-tune from a config, or train seeds of it together; the flags of a job of several processes."""
    train = add("train", help="fine-tune from a YAML experiment config")
    train.add_argument("config", nargs="+", help="YAML file, e.g. configs/quickstart.yaml; several that differ only in "
                       "train.seed (and train.output_dir) train together in one batched step (experiment.run_seeds)")
    train.add_argument("--seeds", type=int, nargs="+", metavar="S", help="train these seeds of the config together in "
                       "one batched step, each in OUTPUT_DIR/seed<S> (experiment.run_seeds)")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    train.add_argument("--output-dir", help="where to write metrics and the adapter (train.output_dir)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir/checkpoints")
    many = train.add_argument_group("several processes (hosts): run the same command on each, see docs/guides/meshes.md")
    many.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address and a free port "
                      "(env DECOMP_JAX_COORDINATOR)")
    many.add_argument("--num-processes", type=int, metavar="N", help="processes in the job (env DECOMP_JAX_NUM_PROCESSES)")
    many.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (env DECOMP_JAX_PROCESS_ID)")
    many.add_argument("--distributed", action="store_true", help="let JAX detect the processes (TPU pod slices, "
                      "SLURM, Open MPI, Kubernetes, JAX_COORDINATOR_ADDRESS)")
    many.add_argument("--init-timeout", type=float, default=INIT_TIMEOUT, metavar="S",
                      help=f"seconds to wait for the coordinator and every process (default {INIT_TIMEOUT})")
    many.add_argument("--heartbeat-timeout", type=int, default=HEARTBEAT_TIMEOUT, metavar="S",
                      help=f"a process silent this long counts as dead and the others stop (default {HEARTBEAT_TIMEOUT})")
    train.set_defaults(func=_train)


def _add_eval(add) -> None:
    """``eval``: evaluate a finished run folder."""
    ev = add("eval", help="evaluate a finished run folder on the dev set")
    ev.add_argument("run_dir", help="the output_dir of a `decomp-jax train` run")
    ev.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    ev.set_defaults(func=_eval)


def _add_merge(add) -> None:
    """``merge``: write a run's adapted model merged into plain weights."""
    mg = add("merge", help="write a run's adapted model merged into plain weights (Flax and PyTorch formats)")
    mg.add_argument("--checkpoint", required=True, help="a run's output_dir (latest checkpoint) or output_dir/checkpoints/STEP")
    mg.add_argument("--out", required=True, help="the folder to write")
    mg.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    mg.set_defaults(func=_merge)


def _add_export(add) -> None:
    """``export``: write a run's adapter in the PEFT format."""
    ex = add("export", help="write a run's adapter in the Hugging Face PEFT format")
    ex.add_argument("--checkpoint", required=True, help="a run's output_dir (latest checkpoint) or output_dir/checkpoints/STEP")
    ex.add_argument("--format", default="peft", choices=["peft"], help="peft (merged weights: `decomp-jax merge`)")
    ex.add_argument("--out", required=True, help="the folder to write")
    ex.add_argument("--base-model-id", help="the base model's hub id to record as base_model_name_or_path (default: "
                    "the run's model.hub_id, else model.name or the hub id of the model package it names)")
    ex.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    ex.set_defaults(func=_export)


def _add_import(add) -> None:
    """``import``: turn a PEFT adapter folder into a run folder."""
    im = add("import", help="turn a Hugging Face PEFT adapter folder into a run folder")
    im.add_argument("peft_dir", help="a folder with adapter_config.json and adapter_model.safetensors (or the older "
                    "adapter_model.bin, read with torch)")
    im.add_argument("--subfolder", help="a named adapter PEFT saved in a subfolder of peft_dir")
    im.add_argument("--config", required=True, help="an experiment YAML naming the base model and the task")
    im.add_argument("--out", required=True, help="the run folder to write")
    im.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    im.set_defaults(func=_import)


def _add_methods(add) -> None:
    """``methods``: list the methods, with their trainable parameters on a config's model or at the paper's budgets."""
    me = add("methods", help="list the methods: family, formula, and trainable parameters for a config")
    me.add_argument("config", nargs="?", help="an experiment YAML: count each method's trainable parameters on its "
                    "model with its targets, rank and train_extra")
    me.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    me.add_argument("--paper-budgets", action="store_true", help="every method's trainable parameters on RoBERTa-base "
                    "(random, shapes only) at the paper's placements, per mille of 125M, beside the paper's column")
    me.add_argument("--rank", type=int, default=2, help="--paper-budgets: the rank of the low-rank methods (default 2)")
    me.set_defaults(func=_methods)


def _add_sweep(add) -> None:
    """``sweep``: run a study's grid of experiments, or list its cells."""
    sw = add("sweep", help="run a study: a grid of experiments (methods x tasks x ranks x seeds ...), resumable")
    sw.add_argument("study", help="a study YAML, e.g. configs/study/minilm_glue_cpu.yaml")
    sw.add_argument("--workers", type=int, default=1, help="cells run at once on this machine (default 1)")
    sw.add_argument("--shard", metavar="I/N", help="run only the cells with index = I mod N (a cluster array job: "
                    "one shard per task, e.g. --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    sw.add_argument("--output-dir", help="the study folder (default: the study's output_dir, else studies/NAME)")
    sw.add_argument("--batch-seeds", action="store_true", help="train the pending seeds of each setting together in "
                    "one process and one batched step over one copy of the base (pays on a GPU; every shard needs it too)")
    sw.add_argument("--dry-run", action="store_true", help="list the cells and their status (done, partial, failed, pending) with counts over the whole grid; run nothing")
    sw.set_defaults(func=_sweep)


def _add_report(add) -> None:
    """``report``: aggregate a study folder."""
    rp = add("report", help="aggregate a study folder: tables (Markdown, CSV, LaTeX), plots, paired comparisons")
    rp.add_argument("study_dir", help="the output folder of `decomp-jax sweep`")
    rp.add_argument("--out", help="where to write (default STUDY_DIR/report)")
    rp.add_argument("--pair", action="append", metavar="A:B", help="a paired comparison A - B (repeatable; "
                    "default: the study file's pairs)")
    rp.set_defaults(func=_report)


def _add_bench(add) -> None:
    """``bench``: time the train steps of full fine-tuning and the methods (``--decoder``: our Llama)."""
    be = add("bench", help="time a train step of full fine-tuning and every method (and HF PEFT); "
                        "write bench.json, bench.md, bench.png")
    be.add_argument("--out", default="bench", help="the folder to write (default: bench/)")
    be.add_argument("--quick", action="store_true", help="a few minutes: MiniLM only; full, lora, dora, ssl, ssb, ia3 "
                    "(lora, dora, ssb also merged); HF PEFT lora, dora, ia3; 2 warm-up and 5 timed steps")
    be.add_argument("--decoder", action="store_true", help="the decoder LLM case instead: our Llama's "
                    "full fine-tuning, LoRA, DoRA, SSB against transformers / HF PEFT LoRA, DoRA, interleaved; "
                    "generation against transformers; writes bench_decoder.json, bench_decoder.md")
    be.add_argument("--models", help="comma-separated: minilm,bert-base (default: both; --quick: minilm); "
                    "with --decoder: smollm2,llama-1b,qwen3-0.6b,qwen3-moe (default: all four)")
    be.add_argument("--methods", help="comma-separated method names (default: all; full fine-tuning always runs)")
    be.add_argument("--batch-size", type=int, help="batch size (default 32; --decoder: 4 for smollm2, 2 for llama-1b and qwen3-0.6b)")
    be.add_argument("--seq-len", type=int, help="sequence length (default 64; --decoder: 256 for smollm2, 128 for llama-1b and qwen3-0.6b)")
    be.add_argument("--warmup", type=int, help="untimed steps, the first included (default 3; bert-base 1)")
    be.add_argument("--steps", type=int, help="timed steps (default 10; bert-base 5; --decoder: per round, default 2)")
    be.add_argument("--backbone", choices=("native", "hf"),
                    help="the encoder code: native (decomp_jax.models.bert, default) or hf (transformers' Flax classes)")
    be.add_argument("--no-peft", action="store_true", help="do not time HF PEFT in PyTorch")
    be.add_argument("--no-merged", action="store_true", help="do not time mode='merged'")
    be.add_argument("--rounds", type=int, help="--decoder: interleaved rounds (default 3) of --steps steps (default 2)")
    be.add_argument("--decoder-layers", type=int, help="--decoder: layers of the random llama-1b and qwen3-0.6b "
                    "models (default: all their layers (16, 28) on an accelerator, 2 on a CPU)")
    be.add_argument("--no-generation", action="store_true", help="--decoder: do not time generation")
    be.add_argument("--long", action="store_true", help="long sequences (with or without --decoder): SmolLM2's LoRA step (scan + "
                    "remat) by sequence length with all-at-once and chunked attention (XLA memory, step time), and "
                    "packing against padding on the commonsense CPU config; writes bench_long.json, bench_long.md")
    be.add_argument("--lengths", help="--long: comma-separated sequence lengths (default 512,1024,2048,4096)")
    be.add_argument("--no-packing", action="store_true", help="--long: skip the packing measurement")
    be.add_argument("--no-sweep", action="store_true", help="--long: skip the sequence-length sweep (packing only)")
    be.set_defaults(func=_bench)


def _add_convert(add) -> None:
    """``convert``: convert a Llama checkpoint into an HF folder."""
    cv = add("convert", help="convert a Llama checkpoint (.gguf file or HF safetensors folder) into an HF "
                        "folder that decomp_jax.models.convert.load_hf and PyTorch from_pretrained read")
    cv.add_argument("src", help="a .gguf file (dequantised to float32) or a folder with config.json and safetensors")
    cv.add_argument("--out", required=True, help="the folder to write")
    cv.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    cv.set_defaults(func=_convert)



def _one_line(message, category, *args, **kwargs) -> str:
    """A warning as one ``decomp-jax: warning: ...`` line (Python's default adds the source line)."""
    return f"decomp-jax: warning: {' '.join(str(message).split())}\n"


def _expected_errors() -> tuple[type, ...]:
    """What bad input, files or numbers raise: reported as one line (``--debug``: the traceback)."""
    import jax
    import yaml
    from safetensors import SafetensorError

    return (ConfigError, ValueError, OSError, KeyError, FloatingPointError, ImportError, yaml.YAMLError,
            SafetensorError, jax.errors.JaxRuntimeError)  # the last: out of memory and the like


def error_line(err: BaseException) -> str:
    """``err`` as one line: our errors speak for themselves, others say their type."""
    from decomp_jax.training.checkpoint import CheckpointError
    from decomp_jax.guards import FileFormatError, FolderInUseError, NonFiniteError, OutputExistsError, UnwritableFolderError

    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(text.split()) or type(err).__name__
    ours = (ConfigError, FileNotFoundError, NonFiniteError, CheckpointError, OutputExistsError, FolderInUseError,
            UnwritableFolderError, FileFormatError)
    return text if isinstance(err, ours) else f"{type(err).__name__}: {text}"


# the commands that run compiled steps re-execute themselves under jemalloc when it is installed (XLA:CPU's
# per-step temporary buffer is not page-faulted again every step; decomp_jax.app.allocator); DECOMP_JAX_ALLOCATOR=system: never
COMPUTE_COMMANDS = ("train", "eval", "merge", "bench")


def main(argv=None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if argv is None and args.command in COMPUTE_COMMANDS:  # a new process: jemalloc where it is installed
        from decomp_jax.app.allocator import maybe_reexec

        maybe_reexec([sys.executable, "-m", "decomp_jax.app.cli", *args.argv])
    original, warnings.formatwarning = warnings.formatwarning, _one_line
    args.signal = None
    term = _on_sigterm(args) if args.command != "sweep" else None  # (sweep stops its cells itself)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside train (train says where it stopped)
        if getattr(args, "debug", False):
            raise
        print(f"decomp-jax: {args.command} stopped ({args.signal or 'Ctrl-C'}); its output is written whole or not at "
              f"all, so nothing half-written is left.", file=sys.stderr)
        return 130
    except _expected_errors() as err:
        if getattr(args, "debug", False):  # given before or after the command's name
            raise
        print(f"decomp-jax: error: {error_line(err)} (run with --debug for the traceback)", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = original
        if term is not None:
            import signal

            signal.signal(signal.SIGTERM, term)


def _on_sigterm(args):
    """Make SIGTERM (a scheduler's time limit, ``kill``) stop the command as Ctrl-C does, so its files are
    left whole and it says so in one line; returns the previous handler (None off the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        args.signal = "SIGTERM"
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    sys.exit(main())
