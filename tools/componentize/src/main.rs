//! `componentize`: the last step of building a raftvm guest.
//!
//! ```text
//! componentize IN.wasm OUT.wasm [--no-check] [--wit PATH]
//!     Turn a core module that carries wit-bindgen's `component-type` custom
//!     section into a component (a component input is copied as is), then check
//!     it against the raftvm world (unless --no-check).
//! componentize --check FILE.wasm [--wit PATH]
//!     Check that FILE is a component that targets raftvm:machine/state-machine
//!     and imports nothing outside that world.
//! componentize --print-wit FILE.wasm
//!     Print the WIT world of a component.
//! componentize --same-exports A.wasm B.wasm
//!     Check that two components export exactly the same functions (ignoring
//!     componentize-py's build-time `exports` interface).
//! ```
//!
//! The world is `wit/machine.wit`, compiled into this binary; `--wit PATH`
//! (a file or a directory) overrides it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use wit_component::{ComponentEncoder, DecodedWasm, WitPrinter};
use wit_parser::{Resolve, WorldId, WorldItem, WorldKey};

/// The contract every guest implements, as of this build.
const MACHINE_WIT: &str = include_str!("../../../wit/machine.wit");
const PACKAGE: &str = "raftvm:machine";
const WORLD: &str = "state-machine";

const USAGE: &str = "\
usage: componentize IN.wasm OUT.wasm [--no-check] [--wit PATH]
       componentize --check FILE.wasm [--wit PATH]
       componentize --print-wit FILE.wasm
       componentize --same-exports A.wasm B.wasm";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("componentize: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> Result<()> {
    let mut wit: Option<PathBuf> = None;
    let mut check = true;
    let mut mode: Option<String> = None;
    let mut files = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "--wit" => wit = Some(it.next().context("--wit needs a path")?.into()),
            "--no-check" => check = false,
            "--check" | "--print-wit" | "--same-exports" => {
                if mode.is_some() {
                    bail!("only one mode at a time\n{USAGE}");
                }
                mode = Some(arg);
            }
            s if s.starts_with('-') && s.len() > 1 => bail!("unknown option {s}\n{USAGE}"),
            _ => files.push(PathBuf::from(arg)),
        }
    }

    match (mode.as_deref(), files.as_slice()) {
        (None, [input, output]) => {
            let component = componentize(&read(input)?)
                .with_context(|| format!("componentizing {}", input.display()))?;
            if check {
                let (resolve, world) = machine_world(wit.as_deref())?;
                check_component(&resolve, world, &component)
                    .with_context(|| format!("checking {}", input.display()))?;
            }
            std::fs::write(output, &component)
                .with_context(|| format!("writing {}", output.display()))?;
            println!("{} ({} bytes)", output.display(), component.len());
            Ok(())
        }
        (Some("--check"), [file]) => {
            let (resolve, world) = machine_world(wit.as_deref())?;
            let bytes = read(file)?;
            let summary = check_component(&resolve, world, &bytes)
                .with_context(|| format!("checking {}", file.display()))?;
            println!("{}: ok, {} bytes", file.display(), bytes.len());
            println!("  imports: {}", join(&summary.imports));
            println!("  exports: {}", join(&summary.exports));
            Ok(())
        }
        (Some("--print-wit"), [file]) => {
            print!("{}", component_wit(&read(file)?)?);
            Ok(())
        }
        (Some("--same-exports"), [a, b]) => {
            let ea = export_signatures(&read(a)?).with_context(|| format!("{}", a.display()))?;
            let eb = export_signatures(&read(b)?).with_context(|| format!("{}", b.display()))?;
            if ea != eb {
                let only_a: Vec<_> = ea.difference(&eb).cloned().collect();
                let only_b: Vec<_> = eb.difference(&ea).cloned().collect();
                bail!(
                    "exports differ\n  only in {}: {}\n  only in {}: {}",
                    a.display(),
                    join(&only_a),
                    b.display(),
                    join(&only_b)
                );
            }
            println!(
                "{} and {} export the same {} functions",
                a.display(),
                b.display(),
                ea.len()
            );
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn join<S: AsRef<str>>(items: &[S]) -> String {
    if items.is_empty() {
        return "(none)".into();
    }
    items
        .iter()
        .map(|s| s.as_ref())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Core module + embedded metadata -> component. Components pass through.
fn componentize(bytes: &[u8]) -> Result<Vec<u8>> {
    if wasmparser::Parser::is_component(bytes) {
        return Ok(bytes.to_vec());
    }
    if !wasmparser::Parser::is_core_wasm(bytes) {
        bail!("not a WebAssembly module or component");
    }
    ComponentEncoder::default()
        .module(bytes)
        .context("reading the component-type metadata (was the module built with a wit-bindgen whose wit-component is 0.254.x?)")?
        .validate(true)
        .encode()
        .context("encoding the component")
}

/// Loads the raftvm world, from `--wit` or from the copy compiled in.
fn machine_world(wit: Option<&Path>) -> Result<(Resolve, WorldId)> {
    let mut resolve = Resolve::default();
    let pkg = match wit {
        Some(path) => {
            resolve
                .push_path(path)
                .with_context(|| format!("parsing {}", path.display()))?
                .0
        }
        None => resolve
            .push_str("wit/machine.wit", MACHINE_WIT)
            .context("parsing the built-in wit/machine.wit")?,
    };
    let world = resolve.select_world(&[pkg], Some(WORLD))?;
    Ok((resolve, world))
}

struct Summary {
    imports: Vec<String>,
    exports: Vec<String>,
}

/// What the host requires: a valid component whose imports are a subset of the
/// world's (by name, and type-compatible) and whose exports cover the world's.
fn check_component(resolve: &Resolve, world: WorldId, bytes: &[u8]) -> Result<Summary> {
    if !wasmparser::Parser::is_component(bytes) {
        bail!("not a component (a core module? run `componentize IN OUT` first)");
    }
    let mut validator = wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all());
    validator.validate_all(bytes).context("invalid component")?;

    // Name-level check first, for a readable message (e.g. WASI imports).
    let mut imports = Vec::new();
    let mut exports = Vec::new();
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload? {
            wasmparser::Payload::ModuleSection { .. }
            | wasmparser::Payload::ComponentSection { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::ComponentImportSection(s) if depth == 0 => {
                for import in s {
                    imports.push(import?.name.name.to_string());
                }
            }
            wasmparser::Payload::ComponentExportSection(s) if depth == 0 => {
                for export in s {
                    exports.push(export?.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    let allowed: BTreeSet<String> = resolve.worlds[world]
        .imports
        .keys()
        .map(|k| resolve.name_world_key(k))
        .collect();
    let foreign: Vec<&String> = imports.iter().filter(|i| !allowed.contains(*i)).collect();
    if !foreign.is_empty() {
        bail!(
            "imports outside {PACKAGE}/{WORLD}: {} (the host refuses these; is WASI or a libc pulling them in?)",
            foreign.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        );
    }

    // Type-level check: wasmparser instantiates a component that imports the
    // world's component type with this component.
    wit_component::targets(resolve, world, bytes)
        .with_context(|| format!("the component does not implement {PACKAGE}/{WORLD}"))?;
    Ok(Summary { imports, exports })
}

fn decode_component(bytes: &[u8]) -> Result<(Resolve, WorldId)> {
    match wit_component::decode(bytes).context("decoding the component's WIT")? {
        DecodedWasm::Component(resolve, world) => Ok((resolve, world)),
        DecodedWasm::WitPackage(..) => bail!("this is a WIT package, not a component"),
    }
}

fn component_wit(bytes: &[u8]) -> Result<String> {
    let (resolve, world) = decode_component(bytes)?;
    let pkg = resolve.worlds[world]
        .package
        .context("decoded world has no package")?;
    // Print the dependencies (raftvm:machine) after the synthesised root package.
    let nested: Vec<_> = resolve
        .packages
        .iter()
        .map(|(id, _)| id)
        .filter(|id| *id != pkg)
        .collect();
    let mut printer = WitPrinter::default();
    printer.print(&resolve, pkg, &nested)?;
    Ok(format!("{}\n", printer.output))
}

/// `name: func(...)` for every function export, as printed WIT, plus the
/// names of exported interfaces, so two guests can be compared.
fn export_signatures(bytes: &[u8]) -> Result<BTreeSet<String>> {
    let (resolve, world) = decode_component(bytes)?;
    let wit = component_wit(bytes)?;
    let mut out = BTreeSet::new();
    for (key, item) in &resolve.worlds[world].exports {
        match (key, item) {
            (WorldKey::Name(name), WorldItem::Function(_)) => {
                // Take the signature from the printed world, e.g.
                // `export apply: func(ctx: apply-context, ...) -> ...;`.
                let prefix = format!("export {name}: ");
                let line = wit
                    .lines()
                    .map(str::trim)
                    .find(|l| l.starts_with(&prefix))
                    .with_context(|| format!("export {name} not found in the printed WIT"))?;
                out.insert(
                    line.trim_start_matches("export ")
                        .trim_end_matches(';')
                        .to_string(),
                );
            }
            // componentize-py leaves its build-time hook in every Python component, an
            // `exports` interface with `init` (run once by its pre-initializer, never by
            // a host): not part of what the host sees, so not compared.
            (WorldKey::Name(name), WorldItem::Interface { .. }) if name == "exports" => {}
            (key, _) => {
                out.insert(resolve.name_world_key(key));
            }
        }
    }
    Ok(out)
}
