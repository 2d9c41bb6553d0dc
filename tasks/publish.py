"""Publish: the model registry and its champion pointer.

    registry/<model-name>/<version>/adapter/        the LoRA adapter (PEFT), tokenizer, chat template
    registry/<model-name>/<version>/eval.json       base / candidate / champion scores and the decision
    registry/<model-name>/<version>/run_manifest.json   the training run's reproducibility record
    registry/<model-name>/<version>/README.md       the model card
    registry/<model-name>/<version>/manifest.json   sha256 and size of every file above (written last)
    registry/<model-name>/CHAMPION                  the version in service; replaced atomically

A version directory is written under a temporary name and renamed into place, so a reader sees a
whole version or none. The champion pointer moves only when the evaluation said promote.
"""

from __future__ import annotations

import hashlib
import shutil
from datetime import datetime, timezone
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE

from foundation.atomic import exclusive_lock, read_json, remove_stale_tmp, staged_dir, write_bytes_atomic, write_json_atomic
from foundation.errors import SftflowError
from foundation.workspace import Workspace


class PublishError(SftflowError):
    """The run cannot be published as asked (not evaluated, or already published)."""


def champion_of(workspace: Workspace, name: str) -> dict | None:
    """The champion of a model name: {version, model_path, adapter_dir}, or None when there is none."""
    pointer = workspace.registry_dir / name / "CHAMPION"
    if not pointer.exists():
        return None
    version_dir = workspace.registry_dir / name / pointer.read_text().strip()
    run = read_json(version_dir / "run_manifest.json")
    return {"version": version_dir.name, "model_path": run["model_path"], "adapter_dir": str(version_dir / "adapter")}


def file_manifest(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under root, by relative path."""
    entries = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        entries[str(path.relative_to(root))] = {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}
    return entries


def verify_version(version_dir: Path) -> list[str]:
    """Files whose content does not match manifest.json (missing, changed or unlisted); [] when intact."""
    listed = read_json(version_dir / "manifest.json")["files"]
    actual = file_manifest(version_dir)
    actual.pop("manifest.json", None)
    return sorted(p for p in set(listed) | set(actual) if listed.get(p) != actual.get(p))


def _gguf_section(exported: dict | None) -> str:
    if not exported or not exported.get("passed"):
        return "No GGUF files: this run was not exported (`sftflow export --run RUN_ID`).\n"
    rows = ["| file | bytes | KL vs HF | top-1 | greedy match |", "|---|---|---|---|---|"]
    for kind, path in exported["files"].items():
        p = exported["parity"][kind]
        rows.append(f"| gguf/{Path(path).name} | {exported['bytes'][kind]} | {p['kl']:.2e} | {p['top1']:.3f} | "
                    f"{p['greedy_match']:.3f} |")
    control = exported["parity"]["control_base_f16"]
    q = next((Path(v).name for k, v in exported["files"].items() if k == "q4_k_m"), Path(exported["files"]["f16"]).name)
    return (
        "\n".join(rows)
        + f"\n\nControl (the base model without the adapter, f16): KL {control['kl']:.2e}, top-1 {control['top1']:.3f}."
        + f"\n\nWith llama.cpp: `llama-cli -m gguf/{q} -cnv` (or `llama_cpp.Llama('gguf/{q}')` in Python)."
        + "\nWith Ollama: `ollama create my-model -f Modelfile && ollama run my-model`.\n"
    )


def model_card(name: str, version: str, run: dict, evaluation: dict, exported: dict | None = None) -> str:
    scores = evaluation["scores"]
    metrics = ("eval_loss", "perplexity", "exact_match", "rouge_l", "chrf", "json_valid", "stop_rate")
    table = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for model, s in scores.items():
        table.append(f"| {model} | " + " | ".join("-" if s.get(m) is None else str(s[m]) for m in metrics) + " |")
    config = run["config"]
    drops = ", ".join(d["drop_id"] for d in read_json(Path(run["dataset_dir"]) / "manifest.json")["drops"])
    LLAMA = exported["llama_cpp_python"] if exported else "-"
    return f"""# {name} {version}

A LoRA adapter for `{config['model']['name']}` fine-tuned by sftflow.

- Base model: `{config['model']['name']}` (loaded from `{run['model_path']}`)
- Dataset version: `{run['dataset_version']}` (drops: {drops})
- Training run: `{run['run_id']}`, {run['engine']} engine, {run['global_step']} steps, config hash `{run['config_hash']}`
- LoRA: r={config['lora']['r']}, alpha={config['lora']['alpha']}, targets {config['lora']['target_modules']}
- Throughput: {run['tokens_per_s']} trained tokens/s, peak memory {run['peak_mem_gib']} GiB ({run['hardware'].get('gpus') or 'CPU'})

## Evaluation (held-out split)

{chr(10).join(table)}

Decision: **{'promoted to champion' if evaluation['decision']['promote'] else 'not promoted'}** — {evaluation['decision']['reason']}.

## GGUF files (llama.cpp {LLAMA})

{_gguf_section(exported)}
## Use it

With transformers + peft:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base = AutoModelForCausalLM.from_pretrained("{run['model_path']}")
model = PeftModel.from_pretrained(base, "adapter")
tokenizer = AutoTokenizer.from_pretrained("adapter")
```

The full training config is in `run_manifest.json`; `manifest.json` lists the sha256 of every file.
"""


def copy_to_remote(version_dir: Path, remote: str, name: str) -> str:
    """Copy a version to an fsspec URL: every file, then manifest.json last, so a reader that waits for
    the manifest never sees a partial version (object stores have no atomic rename)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(remote.rstrip("/"))
    target = f"{root}/{name}/{version_dir.name}"
    files = sorted(p for p in version_dir.rglob("*") if p.is_file() and p.name != "manifest.json")
    for path in [*files, version_dir / "manifest.json"]:
        destination = f"{target}/{path.relative_to(version_dir)}"
        fs.makedirs(destination.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(path), destination)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return target if protocol in ("file", "local") else f"{protocol}://{target}"


def upload_to_hub(version_dir: Path, repo_id: str) -> str:
    """Upload to the Hugging Face Hub when a token is configured; otherwise say why it was skipped."""
    import os

    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        return f"skipped: no HF_TOKEN set, {version_dir.name} was not uploaded to {repo_id}"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return f"skipped: HF_HUB_OFFLINE=1, {version_dir.name} was not uploaded to {repo_id}"
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(version_dir), repo_id=repo_id, commit_message=f"sftflow {version_dir.name}")
    except Exception as exc:  # the local version stands; the message must never carry the token
        reason = str(exc).replace(token, "<HF_TOKEN>").splitlines()[0][:300] if str(exc) else type(exc).__name__
        return (f"failed: {version_dir.name} was not uploaded to {repo_id} ({reason}); upload it with "
                f"`huggingface-cli upload {repo_id} {version_dir}`")
    return f"uploaded to https://huggingface.co/{repo_id}"


def _version_number(name: str) -> int:
    return int(name[1:]) if name[:1] == "v" and name[1:].isdigit() else 0


def _remote_complete(remote: str, name: str, version: str) -> bool:
    import fsspec

    fs, root = fsspec.core.url_to_fs(remote.rstrip("/"))
    return fs.exists(f"{root}/{name}/{version}/manifest.json")


@task(cache_policy=NO_CACHE)
def publish_run(run_dir: Path, workspace: Workspace) -> dict:
    """Write a registry version for an evaluated run; move the champion pointer if it was promoted.

    Publishing a run whose earlier publish was interrupted (killed after the version appeared but
    before the champion pointer moved or the remote copy was finished) finishes that publish.
    """
    logger = get_run_logger()
    if not (run_dir / "eval.json").exists():
        raise PublishError(f"run {run_dir.name} has no eval.json; evaluate it first: sftflow evaluate --run {run_dir.name}")
    run = read_json(run_dir / "manifest.json")
    evaluation = read_json(run_dir / "eval.json")
    name = run["config"]["name"]
    promote = evaluation["decision"]["promote"]
    remote = (run["config"].get("publish") or {}).get("remote")
    model_root = workspace.registry_dir / name
    model_root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(model_root / ".lock"):
        remove_stale_tmp(model_root)
        published = {read_json(p)["run_id"]: p.parent for p in model_root.glob("v*/manifest.json")}
        champion = champion_of(workspace, name)
        if run["run_id"] in published:
            target = published[run["run_id"]]
            version = target.name
            # the champion is the newest promoted version: a promoted version newer than the pointer
            # means a publish died between renaming the version into place and moving the pointer
            pointer_behind = promote and (champion is None or _version_number(champion["version"]) < _version_number(version))
            remote_behind = bool(remote) and not _remote_complete(remote, name, version)
            if not (pointer_behind or remote_behind):
                raise PublishError(f"run {run['run_id']} is already published under {model_root}")
            logger.info("finishing the interrupted publish of %s as %s/%s", run["run_id"], name, version)
        else:
            # after the highest number, not the count: a removed version's number is never reused
            version = f"v{max(map(_version_number, (p.name for p in published.values())), default=0) + 1:04d}"
            target = model_root / version
            pointer_behind = promote
            with staged_dir(target) as tmp:
                shutil.copytree(run["adapter_dir"], tmp / "adapter")
                exported = read_json(run_dir / "export.json") if (run_dir / "export.json").exists() else None
                if exported and exported.get("passed"):
                    shutil.copytree(run_dir / "gguf", tmp / "gguf")
                    shutil.copyfile(run_dir / "Modelfile", tmp / "Modelfile")
                    shutil.copyfile(run_dir / "export.json", tmp / "export.json")
                shutil.copyfile(run_dir / "eval.json", tmp / "eval.json")
                shutil.copyfile(run_dir / "manifest.json", tmp / "run_manifest.json")
                (tmp / "README.md").write_text(model_card(name, version, run, evaluation, exported))
                write_json_atomic(tmp / "manifest.json", {
                    "name": name, "version": version, "run_id": run["run_id"],
                    "dataset_version": run["dataset_version"], "promoted": promote,
                    "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "files": file_manifest(tmp),
                })
        if pointer_behind:
            write_bytes_atomic(model_root / "CHAMPION", f"{version}\n".encode())
            champion = {"version": version}
    logger.info("published %s/%s (%s)", name, version, "champion" if champion and champion["version"] == version else
                "not promoted")
    create_link_artifact(key="published-model", link=target.as_uri(), link_text=f"{name} {version}",
                         description=f"Registry version of run {run['run_id']}")
    result = {"name": name, "version": version, "path": str(target), "promoted": promote,
              "champion": champion["version"] if champion else None}
    options = run["config"].get("publish") or {}
    if remote:
        result["remote"] = copy_to_remote(target, remote, name)
        logger.info("copied %s/%s to %s", name, version, result["remote"])
    if options.get("hub_repo"):
        result["hub"] = upload_to_hub(target, options["hub_repo"])
        (logger.warning if result["hub"].startswith("failed") else logger.info)("hub: %s", result["hub"])
    return result
