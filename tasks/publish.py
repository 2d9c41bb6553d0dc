"""Publish: a registry version of an evaluated run, its model card, and the champion pointer.

The registry's layout is `foundation.stores.registry`'s. A version directory is written under a
temporary name and renamed into place, so a reader sees a whole version or none; its manifest lists
the sha256 of every file. The champion pointer moves only when the evaluation said promote
(`champion_moves`). A remote (fsspec URL) and the Hugging Face Hub get a copy when configured, of the files
the manifest lists and only once each checks against it.

Credentials in the remote's URL (`https://user:token@host/...`) are written nowhere: the run manifest holds
the URL redacted (`https://***@host/...`), and so do the registry, the logs and the result; the real URL
comes from the config loaded in this process (`sftflow pipeline`), or the filesystem reads its credentials
from its own configuration (FSSPEC_<PROTOCOL>_<KWARG> variables, ~/.aws/credentials, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from foundation.artifacts import EvalReport, ExportReport, FileDigest, PublishResult, RunManifest, VersionManifest
from foundation.atomic import sha256_of
from foundation.credentials import real_url, redact_url, scrub, url_secrets, without_credentials
from foundation.errors import SftflowError
from foundation.stores.datasets import DatasetVersion
from foundation.stores.registry import MANIFEST, RegistryStore, VersionDir, version_number
from foundation.stores.runs import RunDir
from foundation.workspace import Workspace
from schemas.config import RunConfig
from schemas.metrics import NAMES as METRIC_NAMES
from schemas.quants import NAMES as QUANT_NAMES, smallest


class PublishError(SftflowError):
    """The run cannot be published as asked (not evaluated, or already published)."""


def champion_moves(promote: bool, champion: str | None, version: str) -> bool:
    """The champion pointer moves to `version` when it was promoted and the pointer names an older version
    (or none): the champion is the newest promoted version. A promoted version newer than the pointer means
    a publish died between renaming the version into place and moving the pointer."""
    return promote and (champion is None or version_number(champion) < version_number(version))


def file_manifest(root: Path) -> dict[str, FileDigest]:
    """sha256 and size of every file under root, by relative path; the files hashed side by side (hashlib
    lets go of the GIL: the GGUF files of a model hash in the time of the largest)."""
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(sha256_of, paths))
    return {str(path.relative_to(root)): FileDigest(sha256=digest, bytes=path.stat().st_size)
            for path, digest in zip(paths, digests)}


def _gguf_section(exported: ExportReport | None) -> str:
    if not exported or not exported.passed:
        return "No GGUF files: this run was not exported (`sftflow export --run RUN_ID`).\n"
    rows = ["| file | bytes | KL vs HF | top-1 | greedy match |", "|---|---|---|---|---|"]
    for kind, path in exported.files.items():
        p = exported.parity[kind]
        rows.append(f"| gguf/{Path(path).name} | {exported.bytes[kind]} | {p.kl:.2e} | {p.top1:.3f} | "
                    f"{p.greedy_text()} |")
    control = exported.parity["control_base_f16"]
    q = Path(exported.files[smallest([k for k in exported.files if k in QUANT_NAMES])]).name
    return (
        "\n".join(rows)
        + f"\n\nControl (the base model without the adapter, f16): KL {control.kl:.2e}, top-1 {control.top1:.3f}."
        + f"\n\nWith llama.cpp: `llama-cli -m gguf/{q} -cnv` (or `llama_cpp.Llama('gguf/{q}')` in Python)."
        + "\nWith Ollama: `ollama create my-model -f Modelfile && ollama run my-model`.\n"
    )


def _scores_table(scores: dict[str, dict]) -> str:
    table = ["| model | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
    for model, s in scores.items():
        table.append(f"| {model} | " + " | ".join("-" if s.get(m) is None else str(s[m]) for m in METRIC_NAMES) + " |")
    return "\n".join(table)


def model_card(name: str, version: str, run: RunManifest, evaluation: EvalReport, drops: list[str],
               exported: ExportReport | None = None) -> str:
    config = RunConfig.model_validate(run.config)
    decision = evaluation.decision
    return f"""# {name} {version}

A LoRA adapter for `{config.model.name}` fine-tuned by sftflow.

- Base model: `{config.model.name}` (loaded from `{run.model_path}`)
- Dataset version: `{run.dataset_version}` (drops: {", ".join(drops)})
- Training run: `{run.run_id}`, {run.engine} engine, {run.global_step} steps, config hash `{run.config_hash}`
- LoRA: r={config.lora.r}, alpha={config.lora.alpha}, targets {config.lora.target_modules}
- Throughput: {run.tokens_per_s} trained tokens/s, peak memory {run.peak_mem_gib} GiB ({run.hardware.get('gpus') or 'CPU'})

## Evaluation (held-out split)

{_scores_table(evaluation.scores)}

Decision: **{'promoted to champion' if decision.promote else 'not promoted'}** — {decision.reason}.

## GGUF files (llama.cpp {exported.llama_cpp_python if exported else "-"})

{_gguf_section(exported)}
## Use it

With transformers + peft:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base = AutoModelForCausalLM.from_pretrained("{run.model_path}")
model = PeftModel.from_pretrained(base, "adapter")
tokenizer = AutoTokenizer.from_pretrained("adapter")
```

The full training config is in `run_manifest.json`; `manifest.json` lists the sha256 of every file.
"""


def remote_url(recorded: str) -> str:
    """The URL to copy to, for `publish.remote` as the run manifest records it (credentials redacted).

    Redacted credentials come back from the config this process loaded; failing that, the URL goes without
    them when fsspec is configured for its protocol (FSSPEC_<PROTOCOL>_<KWARG> variables or fsspec's config
    files). Otherwise the publish is refused, naming the ways to give them.
    """
    import fsspec.config
    from fsspec.core import split_protocol

    if (real := real_url(recorded)) is not None:
        return real
    protocol = split_protocol(recorded)[0] or "file"
    if fsspec.config.conf.get(protocol):
        return without_credentials(recorded)
    raise PublishError(
        f"publish.remote {recorded} had credentials, which sftflow writes nowhere, so this process does not know "
        "them: publish from the command that loads the config (sftflow pipeline --config FILE), or give them to "
        f"fsspec in the environment (FSSPEC_{protocol.upper()}_<KWARG>, e.g. FSSPEC_S3_KEY and FSSPEC_S3_SECRET) "
        "and write the URL without them")


@contextlib.contextmanager
def _credentials_scrubbed(remote: str, what: str) -> Iterator[None]:
    """An error of the remote's filesystem may echo the URL, credentials and all: raise it without them."""
    try:
        yield
    except Exception as exc:
        if not url_secrets(remote) or isinstance(exc, SftflowError):
            raise
        reason = scrub(str(exc), remote).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise PublishError(f"{what} {redact_url(remote)} failed ({type(exc).__name__}: {reason})") from None


def copy_to_remote(version_dir: Path, remote: str, name: str) -> str:
    """Copy a version to an fsspec URL: the files its manifest lists, each checked against it first, then
    manifest.json last, so a reader that waits for the manifest never sees a partial version (object stores
    have no atomic rename). Returns where it went, credentials redacted."""
    import fsspec

    version = VersionDir(version_dir)
    version.require()
    with _credentials_scrubbed(remote, "copying to"):
        fs, root = fsspec.core.url_to_fs(remote.rstrip("/"))
        target = f"{root}/{name}/{version_dir.name}"
        for relative in [*sorted(version.manifest().files), MANIFEST]:
            destination = f"{target}/{relative}"
            fs.makedirs(destination.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(version.file(relative)), destination)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return scrub(target if protocol in ("file", "local") else f"{protocol}://{target}", remote)


def upload_to_hub(version_dir: Path, repo_id: str) -> str:
    """Upload to the Hugging Face Hub when a token is configured; otherwise say why it was skipped."""
    import os

    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        return f"skipped: no HF_TOKEN set, {version_dir.name} was not uploaded to {repo_id}"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return f"skipped: HF_HUB_OFFLINE=1, {version_dir.name} was not uploaded to {repo_id}"
    from huggingface_hub import HfApi

    VersionDir(version_dir).require()  # nothing changed since it was published
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(version_dir), repo_id=repo_id, commit_message=f"sftflow {version_dir.name}")
    except Exception as exc:  # the local version stands; the message must never carry the token
        reason = str(exc).replace(token, "<HF_TOKEN>").splitlines()[0][:300] if str(exc) else type(exc).__name__
        return (f"failed: {version_dir.name} was not uploaded to {repo_id} ({reason}); upload it with "
                f"`huggingface-cli upload {repo_id} {version_dir}`")
    return f"uploaded to https://huggingface.co/{repo_id}"


def _remote_complete(remote: str, name: str, version: str) -> bool:
    import fsspec

    with _credentials_scrubbed(remote, "reading"):
        fs, root = fsspec.core.url_to_fs(remote.rstrip("/"))
        return fs.exists(f"{root}/{name}/{version}/{MANIFEST}")


def copy_run_manifest(source: Path, target: Path) -> None:
    """Copy a run manifest into a version, with the remote's credentials redacted should it hold them (one
    written before they were redacted in the run manifest itself)."""
    document = json.loads(source.read_bytes())
    publish = (document.get("config") or {}).get("publish") or {}
    if not isinstance(publish.get("remote"), str) or not url_secrets(publish["remote"]):
        shutil.copyfile(source, target)
        return
    publish["remote"] = redact_url(publish["remote"])
    target.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def link_or_copy(source: str, target: str) -> str:
    """A hard link to a run's file (a GGUF takes no second copy of its gigabytes, and no time), or a copy when
    the registry is on another file system. Nothing writes a run's files after its export, and a re-export
    writes new ones (staged, then renamed), so the version keeps the bytes its manifest hashes."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def write_version(registry: RegistryStore, version: str, run: RunDir, promote: bool) -> VersionDir:
    """The version directory, whole: adapter, GGUF files (when the export passed; linked, see link_or_copy),
    evaluation, run manifest, model card, and the manifest of every file's sha256 last."""
    manifest, evaluation, exported = run.manifest(), run.eval_report(), run.export_report()
    exported = exported if exported and exported.passed else None
    drops = [d.drop_id for d in DatasetVersion(Path(manifest.dataset_dir)).manifest.drops]
    with registry.write_version(manifest.name, version) as tmp:
        shutil.copytree(manifest.adapter_dir, tmp.adapter)
        if exported:
            shutil.copytree(run.gguf_dir, tmp.gguf_dir, copy_function=link_or_copy)
            shutil.copyfile(run.modelfile, tmp.modelfile)
            shutil.copyfile(run.export_path, tmp.export_path)
        shutil.copyfile(run.eval_path, tmp.eval_path)
        copy_run_manifest(run.manifest_path, tmp.run_manifest_path)
        tmp.model_card.write_text(model_card(manifest.name, version, manifest, evaluation, drops, exported))
        VersionManifest(name=manifest.name, version=version, run_id=manifest.run_id,
                        dataset_version=manifest.dataset_version, promoted=promote,
                        published_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        files=file_manifest(tmp.root)).write(tmp.manifest_path)
    return registry.version(manifest.name, version)


def publish_version(registry: RegistryStore, run: RunDir, remote: str | None, log) -> tuple[VersionDir, str | None]:
    """Publish the run as a new version, or finish its interrupted publish; (the version, the champion)."""
    manifest, promote = run.manifest(), run.eval_report().decision.promote
    name = manifest.name
    with registry.lock(name):
        published = registry.published_runs(name).get(manifest.run_id)
        champion = registry.champion(name)
        if published is not None:
            remote_behind = bool(remote) and not _remote_complete(remote, name, published.version)
            if not (champion_moves(promote, champion, published.version) or remote_behind):
                raise PublishError(f"run {manifest.run_id} is already published under {registry.model_dir(name)}")
            log(f"finishing the interrupted publish of {manifest.run_id} as {name}/{published.version}")
            target = published
        else:
            target = write_version(registry, registry.next_version(name), run, promote)
        if champion_moves(promote, champion, target.version):
            registry.set_champion(name, target.version)
            champion = target.version
    return target, champion


def published_markdown(name: str, version: str, path: str, run_id: str, champion: bool) -> str:
    """The published-model artifact: where the version lies and the commands that open it (a browser
    cannot follow a link into the worker's file system)."""
    ref = f"{name}@{version}"
    return "\n".join([
        f"# Published `{ref}`{' (champion)' if champion else ''}", "",
        f"Registry version of run `{run_id}`, in `{path}`.", "",
        "| to | run |", "|---|---|",
        f"| see its run, dataset, evaluation and GGUFs | `sftflow models show {ref}` |",
        f"| talk to it | `sftflow chat --model {ref}` |",
        f"| serve it (OpenAI-compatible API) | `sftflow serve --model {ref}` |",
        f"| see the run it came from | `sftflow runs show {run_id}` |",
    ])


@task(cache_policy=NO_CACHE)
def publish_run(run_id: str) -> PublishResult:
    """Write a registry version for an evaluated run; move the champion pointer if it was promoted.

    Publishing a run whose earlier publish was interrupted (killed after the version appeared but
    before the champion pointer moved or the remote copy was finished) finishes that publish.
    """
    logger = get_run_logger()
    workspace = Workspace.from_env().ensure()
    run = workspace.runs.finished(run_id)
    if run.eval_report() is None:
        raise PublishError(f"run {run_id} has no eval.json; evaluate it first: sftflow evaluate --run {run_id}")
    manifest = run.manifest()
    options = RunConfig.model_validate(manifest.config).publish
    remote = remote_url(options.remote) if options.remote else None  # before anything is written
    target, champion = publish_version(workspace.registry, run, remote, logger.info)
    name, version = manifest.name, target.version
    logger.info("published %s/%s (%s)", name, version, "champion" if champion == version else "not promoted")
    create_markdown_artifact(key="published-model", markdown=published_markdown(name, version, str(target.root), run_id,
                                                                                 champion == version),
                             description=f"Registry version of run {run_id}")
    result = PublishResult(name=name, version=version, path=str(target.root), promoted=run.eval_report().decision.promote,
                           champion=champion)
    if remote:
        result.remote = copy_to_remote(target.root, remote, name)
        logger.info("copied %s/%s to %s", name, version, result.remote)
    if options.hub_repo:
        result.hub = upload_to_hub(target.root, options.hub_repo)
        (logger.warning if result.hub.startswith("failed") else logger.info)("hub: %s", result.hub)
    return result
