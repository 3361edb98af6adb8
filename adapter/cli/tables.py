"""The tables' commands: `mue import` (config/mue.yaml from the CMS file) and `conformance export|install`
(the project's FHIR package under the tables' canonical base)."""

from __future__ import annotations

from pathlib import Path

import click

from adapter.cli.group import cli, settings_of, tables_of
from adapter.cli.options import server_client, server_options


@cli.group("conformance")
def conformance_group() -> None:
    """The project's FHIR package (CPT-modifier extension, identifier systems) under urls.canonical_base."""


@conformance_group.command("export")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write into.")
@click.option("--tgz", is_flag=True, help="Write NAME-VERSION.tgz (package/ inside) instead of a folder.")
@click.pass_context
def conformance_export(ctx: click.Context, out: str, tgz: bool) -> None:
    """Write the FHIR NPM package (R4 4.0.1), e.g. for a validator's -ig."""
    from adapter import conformance

    tables = tables_of(ctx)
    click.echo(str(conformance.export(Path(out), tables.settings.canonical_base, tgz=tgz)))


@conformance_group.command("install")
@server_options
@click.pass_context
def conformance_install(ctx: click.Context, server: str | None, auth_file: str | None, ca_bundle: str | None,
                        client_cert: str | None) -> None:
    """Create or update the package's resources on a FHIR server; unchanged ones are not written again."""
    from adapter import conformance

    tables = tables_of(ctx)
    client = server_client(ctx, server, auth_file, ca_bundle, client_cert)
    client.check_server()
    result = conformance.install(client, tables.settings.canonical_base)
    for label in result.written:
        click.echo(f"written:   {label}")
    for label in result.unchanged:
        click.echo(f"unchanged: {label}")
    click.echo(f"{len(result.written)} written, {len(result.unchanged)} unchanged")


@cli.group("mue")
def mue_group() -> None:
    """Medically Unlikely Edits: config/mue.yaml from the CMS practitioner MUE table."""


@mue_group.command("import")
@click.argument("csv_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--quarter", required=True, help="The quarter the CMS file is for, e.g. 2026Q2: its rows are valid "
                                               "from the quarter's first to its last day.")
@click.option("--code", "codes", multiple=True, help="Import this code (repeatable). Default: the FNA family's "
                                                     "codes (config/cpt-fna.yaml).")
@click.option("--all-codes", is_flag=True, help="Import every code of the file.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="The mue.yaml to update (default: the one of the tables folder).")
@click.pass_context
def mue_import(ctx: click.Context, csv_file: str, quarter: str, codes: tuple[str, ...], all_codes: bool,
               out_file: str | None) -> None:
    """Read the CMS practitioner MUE CSV (code, MUE value, adjudication indicator, rationale) into mue.yaml."""
    from adapter.config import DEFAULT_CONFIG_DIR
    from adapter.mue_import import import_file

    tables = tables_of(ctx)
    wanted: set[str] | None = None if all_codes else set(codes) or {
        code for rows in tables.family.values() for _, fam in rows.rows for code in (fam.primary, fam.add_on)}
    folder = ctx.obj.get("tables_dir") or (settings_of(ctx).tables if ctx.obj.get("config_file") else None)
    target = Path(out_file) if out_file else Path(folder or DEFAULT_CONFIG_DIR) / "mue.yaml"
    result = import_file(Path(csv_file), target, quarter, wanted)
    click.echo(f"{len(result.imported)} code(s) imported for {quarter.upper()} ({result.start} to {result.end}) "
               f"into {target}: {', '.join(result.imported) or 'none'}")
    if result.trimmed:
        click.echo(f"earlier rows ended before the quarter or replaced: {', '.join(sorted(set(result.trimmed)))}")
    if result.missing:
        click.echo(f"not in the CMS file (their rows unchanged): {', '.join(result.missing)}", err=True)
