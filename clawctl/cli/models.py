"""`clawctl models`: the daemon's model store (pull, add, list, show, rm, verify, quantize,
convert), through clawd's `/admin/models` routes: clawd owns the store, this only renders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clawctl.cli._client import daemon_client
from clawctl.cli._console import RichProgress, emit_json, err, human_bytes, out, table
from clawctl.cli._options import JsonOption
from clawctl.errors import BadInput, IntegrityError
from clawctl.schemas.models import ConvertRequest, PullRequest, QuantizeRequest

app = typer.Typer(
    help="Manage the daemon's models: pull, add, list, show, rm, verify, quantize, convert.",
    no_args_is_help=True,
)


@app.command("list")
def list_models(json_: JsonOption = False) -> None:
    """List installed models.

    Example: clawctl models list --json
    """
    with daemon_client() as client:
        manifests = client.list_models().models
    if json_:
        emit_json(manifests)
        return
    grid = table("NAME", "ARCH", "QUANT", "SIZE", "DIGEST", "SOURCE")
    for m in manifests:
        grid.add_row(m.name, m.architecture, m.quant, human_bytes(m.size), m.digest[:12], m.source)
    out.print(grid if manifests else "no models installed; try 'clawctl models pull smollm2-135m'")


@app.command()
def show(name: str, json_: JsonOption = False) -> None:
    """Show one installed model's manifest and GGUF metadata.

    Example: clawctl models show smollm2-135m
    """
    with daemon_client() as client:
        manifest = client.show_model(name)
    if json_:
        emit_json(manifest)
        return
    grid = table("FIELD", "VALUE")
    rows = {
        "name": manifest.name,
        "digest": f"sha256:{manifest.digest}",
        "size": human_bytes(manifest.size),
        "source": manifest.source,
        "format": manifest.format,
    }
    if manifest.gguf is not None:
        info = manifest.gguf
        rows |= {
            "architecture": info.architecture,
            "model": info.model_name,
            "quant": info.quant,
            "parameters": f"{info.n_params / 1e6:.0f}M",
            "context length": str(info.context_length),
            "chat template": "yes" if info.chat_template else "no (plain prompt format)",
        }
    if manifest.quality is not None:
        kept = manifest.quality
        matrix = (
            f"; importance matrix sha256:{kept.imatrix_sha256[:12]}" if kept.imatrix_sha256 else ""
        )
        rows["quality kept"] = (
            f"{kept.value:.1%} of {manifest.parent or 'its source'}'s greedy tokens "
            f"({kept.tokens} probe positions{matrix})"
        )
    if manifest.onnx is not None:
        onnx = manifest.onnx
        rows |= {
            "task": onnx.task,
            "architecture": onnx.architecture,
            "parameters": f"{onnx.parameters / 1e6:.0f}M",
            "weights": manifest.quant
            + (
                f" (block {onnx.block_size}, accuracy level {onnx.accuracy_level})"
                if onnx.bits
                else ""
            ),
            "max tokens": str(onnx.max_tokens),
        }
        if onnx.dim is not None:
            rows["dimensions"] = str(onnx.dim)
        if onnx.quality is not None:
            rows["cosine vs float"] = f"{onnx.quality:.4f}"
        if onnx.warning:
            rows["warning"] = f"[yellow]{onnx.warning}[/yellow]"
    rows["parent"] = manifest.parent or "-"
    for key, value in rows.items():
        grid.add_row(key, value)
    out.print(grid)


@app.command()
def pull(
    ref: Annotated[str, typer.Argument(help="Catalog name (e.g. smollm2-135m) or http(s) URL.")],
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 of a URL's file.")] = None,
    json_: JsonOption = False,
) -> None:
    """Fetch a catalog model or a GGUF URL into the store (instant if already there).

    Example: clawctl models pull smollm2-135m
    """
    with daemon_client() as client, RichProgress() as progress:
        pulled = client.pull_model(PullRequest(ref=ref, sha256=sha256), progress)
    manifest, fetched = pulled.manifest, pulled.fetched
    if json_:
        emit_json(manifest)
        return
    verb = (
        ("pulled from the fleet" if pulled.from_fleet else "pulled")
        if fetched
        else ("already present:")
    )
    err.print(
        f"{verb} {manifest.name} ({human_bytes(manifest.size)}, sha256:{manifest.digest[:12]})"
    )


@app.command()
def add(
    path: Annotated[Path, typer.Argument(help="A local GGUF file.")],
    name: Annotated[str | None, typer.Option(help="Name in the store.")] = None,
    json_: JsonOption = False,
) -> None:
    """Upload a local GGUF file to clawd, which checks, hashes and stores it.

    Example: clawctl models add ./my-model.Q4_0.gguf --name my-model
    """
    path = path.expanduser()
    if not path.is_file():
        raise BadInput(f"no such file: {path}")
    with daemon_client() as client, RichProgress() as progress:
        manifest = client.upload_model(path, name, progress)
    if json_:
        emit_json(manifest)
        return
    err.print(
        f"added {manifest.name} ({manifest.architecture} {manifest.quant}, "
        f"{human_bytes(manifest.size)})"
    )


@app.command()
def rm(name: str) -> None:
    """Remove a model (its blob too, once no other name uses it).

    Example: clawctl models rm smollm2-135m-q2_k
    """
    with daemon_client() as client:
        manifest = client.remove_model(name)
    err.print(f"removed {manifest.name}")


@app.command()
def verify(
    names: Annotated[
        list[str] | None, typer.Argument(help="Models to check (default: all).")
    ] = None,
    json_: JsonOption = False,
) -> None:
    """Re-hash model blobs and compare with their manifests.

    Example: clawctl models verify
    """
    with daemon_client() as client:
        results = client.verify_models(names or []).results
    if json_:
        emit_json(results)
    else:
        grid = table("NAME", "DIGEST", "STATUS")
        for r in results:
            grid.add_row(r.name, r.digest[:12], "ok" if r.ok else "[red]MISMATCH[/red]")
        out.print(grid)
    bad = [r.name for r in results if not r.ok]
    if bad:
        raise IntegrityError(f"damaged: {', '.join(bad)}; pull or add them again")


@app.command()
def quantize(
    name: Annotated[str, typer.Argument(help="Installed source model.")],
    to: Annotated[
        str,
        typer.Option(
            "--to", help="GGUF: a llama.cpp type (q4_0, q4_k_m, q2_0, q2_k…); ONNX: int8|int4|int2."
        ),
    ],
    new_name: Annotated[str | None, typer.Option("--name", help="Name of the result.")] = None,
    imatrix: Annotated[
        Path | None,
        typer.Option(help="Importance matrix (GGUF only); clawd's user must be able to read it."),
    ] = None,
    block_size: Annotated[
        int | None, typer.Option(help="ONNX: weights per scale (16-256; 2-bit: 32-128).")
    ] = None,
    accuracy_level: Annotated[
        int | None,
        typer.Option(help="ONNX: MatMulNBits compute type 0-4 (4: int8 activations, fastest)."),
    ] = None,
    json_: JsonOption = False,
) -> None:
    """Quantize an installed model: GGUF with llama.cpp's quantizer, ONNX with onnxruntime's
    MatMulNBits quantizer (reporting the embeddings' cosine against the float model).

    Example: clawctl models quantize smollm2-135m --to q2_0
    Example: clawctl models quantize minilm-l6 --to int8
    """
    if imatrix is not None:
        imatrix = imatrix.expanduser().resolve()  # clawd reads it by this path
        if not imatrix.is_file():
            raise BadInput(f"no such imatrix file: {imatrix}", param="imatrix")
    request = QuantizeRequest(
        name=name,
        to=to,
        new_name=new_name,
        imatrix=str(imatrix) if imatrix else None,
        block_size=block_size,
        accuracy_level=accuracy_level,
    )
    with daemon_client() as client, RichProgress() as progress:
        result = client.quantize_model(request, progress)
    manifest = result.manifest
    if json_:
        emit_json(manifest)
        return
    quality = ""
    if result.mean_cosine is not None and result.min_cosine is not None:
        quality = f", cosine vs float {result.mean_cosine:.4f} (min {result.min_cosine:.4f})"
    err.print(
        f"quantized {name} → {manifest.name} ({manifest.quant}, "
        f"{human_bytes(manifest.size)}{quality})"
    )


@app.command()
def convert(
    name: Annotated[str, typer.Argument(help="Installed GGUF language model.")],
    to: Annotated[str, typer.Option("--to", help="onnx-int4, or onnx-int2 (experimental).")],
    new_name: Annotated[str | None, typer.Option("--name", help="Name of the result.")] = None,
    json_: JsonOption = False,
) -> None:
    """Rebuild a GGUF model as an onnxruntime-genai ONNX model (clawd's environment needs the
    build tools: pip install 'clawctl[convert]'). Q4_1 weights are carried over exactly.

    Example: clawctl models convert smollm2-135m --to onnx-int4
    """
    request = ConvertRequest(name=name, to=to, new_name=new_name)
    with daemon_client() as client, RichProgress() as progress:
        manifest = client.convert_model(request, progress)
    if json_:
        emit_json(manifest)
        return
    err.print(
        f"converted {name} → {manifest.name} ({manifest.quant}, {human_bytes(manifest.size)})"
    )
