//! The `calls` bench's guest-language rows: the echo plugin in JavaScript,
//! Go and Python beside the Rust echo, measured in the same run through
//! the same runtime: a reused-instance call, a per-call-instance call,
//! compile time, and a reload from the compiled-code cache.
//!
//! The components are built here by `evrhost build` from `plugins/{js,go,
//! python}/echo`, with the toolchains `guest-sdk/toolchains/install` put
//! in `target/guest-tools`; without them the rows say so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use evrhost::config::Config;
use evrhost::dispatcher::Dispatcher;
use evrhost::runtime::Runtime;
use wasmtime::component::Component;

use super::{failed, fmt_ns, interleave, median, plugins_dir, request, Results, Row};

/// (language, where its echo comes from): the Rust one is the baseline.
const LANGS: [&str; 4] = ["rust", "js", "go", "python"];

fn tools() -> PathBuf {
    std::env::var_os("EVRHOST_GUEST_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-tools"))
}

/// `plugins/LANG/echo` built into `out`.
fn build(lang: &str, out: &Path) -> anyhow::Result<PathBuf> {
    if lang == "rust" {
        return Ok(plugins_dir().join("echo.wasm"));
    }
    let tools = tools();
    anyhow::ensure!(
        tools.join(".pins").is_file(),
        "no toolchains in {}: run guest-sdk/toolchains/install",
        tools.display()
    );
    let mut path = vec![tools.join("node_modules/.bin"), tools.join("venv/bin")];
    path.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    let wasm = out.join(format!("echo-{lang}.wasm"));
    let project = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins").join(lang).join("echo");
    let output = Command::new(env!("CARGO_BIN_EXE_evrhost"))
        .arg("build")
        .arg(&project)
        .arg("-o")
        .arg(&wasm)
        .env("PATH", std::env::join_paths(path)?)
        .output()?;
    anyhow::ensure!(output.status.success(), "evrhost build {lang}: {}", String::from_utf8_lossy(&output.stderr));
    Ok(wasm)
}

/// One echo per language, each its own route, all with `isolation`. Every
/// echo offers `echo.upper`, so reused and per-call ones need a dispatcher
/// each.
fn config(components: &[PathBuf], cache: &Path, isolation: &str) -> String {
    let mut text = format!("[runtime]\ncache_dir = \"{}\"\n\n[rpc]\nlisten = \"\"\n", cache.display());
    for (lang, wasm) in LANGS.iter().zip(components) {
        text.push_str(&format!(
            "\n[[plugin]]\nname = \"{lang}\"\npath = \"{}\"\nisolation = \"{isolation}\"\n\n[[route]]\nname = \"{lang}\"\nplugin = \"{lang}\"\n",
            wasm.display()
        ));
    }
    text
}

/// What each language's row is held to (the Rust echo is the baseline).
fn target(lang: &str, what: &str) -> (&'static str, Option<f64>) {
    match (lang, what) {
        ("js", "reused") => ("≤15 µs", Some(15e3)),
        ("go", "reused") => ("≤6 µs", Some(6e3)),
        (_, "reload") => ("≤5 ms", Some(5e6)),
        _ => ("reported", None),
    }
}

fn case(lang: &str, what: &str) -> &'static str {
    let name = match lang {
        "js" => "JavaScript",
        "go" => "Go",
        "python" => "Python",
        _ => "Rust",
    };
    Box::leak(format!("{name} echo: {what}").into_boxed_str())
}

pub fn rows(results: &mut Results, scratch: &Path) -> anyhow::Result<()> {
    let out = scratch.join("guests");
    std::fs::create_dir_all(&out)?;
    let mut components = Vec::new();
    for lang in LANGS {
        components.push(build(lang, &out)?);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let cache = scratch.join("guest-cache");

    // Compile time: a cold compile of each, with evrhost's engine settings.
    let reuse_config = Config::parse(&config(&components, &cache, "reuse"), "bench.toml", Path::new("."))?;
    let pc_config = Config::parse(&config(&components, &cache, "per-call"), "bench.toml", Path::new("."))?;
    let engine = super::engine_like_evrhost(&reuse_config.engine)?;
    let mut compile = Vec::new();
    for wasm in &components {
        let bytes = std::fs::read(wasm)?;
        let start = Instant::now();
        Component::new(&engine, &bytes).map_err(|e| anyhow::anyhow!("compile: {e:#}"))?;
        compile.push(start.elapsed().as_nanos() as f64);
    }

    let start = |config: Config| {
        rt.block_on(async move {
            let runtime = Runtime::new(config.engine.clone(), config.cache_dir.clone())?;
            anyhow::Ok(Dispatcher::start(runtime, &config).await?)
        })
    };
    let d: Arc<Dispatcher> = start(reuse_config)?;
    let d_pc: Arc<Dispatcher> = start(pc_config)?;
    let versions: Vec<_> =
        LANGS.iter().map(|l| d.plugin(l).with_context(|| format!("{l} did not load"))).collect::<Result<_, _>>()?;
    let per_call: Vec<_> =
        LANGS.iter().map(|l| d_pc.plugin(l).with_context(|| format!("{l} did not load"))).collect::<Result<_, _>>()?;
    let requests: Vec<_> = LANGS.iter().map(|l| request(l)).collect();

    let reused = rt.block_on(interleave(LANGS.len(), 10, 100, 200, async |k| {
        match versions[k].handle(&requests[k], 0).await.0 {
            Ok(reply) if reply.handled && reply.data.as_deref() == Some(&requests[k].data[..]) => {
                std::hint::black_box(reply);
            }
            _ => failed(),
        }
    }));
    let fresh =
        rt.block_on(interleave(LANGS.len(), 3, 30, 20, async |k| match per_call[k].handle(&requests[k], 0).await.0 {
            Ok(reply) if reply.handled => {
                std::hint::black_box(reply);
            }
            _ => failed(),
        }));
    let reload = rt.block_on(async {
        for l in LANGS {
            if d.reload(l, None).await.is_err() {
                failed();
            }
        }
        interleave(LANGS.len(), 1, 15, 1, async |k| match d.reload(LANGS[k], None).await {
            Ok(v) if v.cache == evrhost::runtime::CacheOutcome::Hit => {}
            _ => failed(),
        })
        .await
    });

    for (what, times) in [("reused call", &reused), ("per-call instance", &fresh), ("reload (cached)", &reload)] {
        let base = median(&times[0]);
        for (k, lang) in LANGS.iter().enumerate().skip(1) {
            let m = median(&times[k]);
            let key = what.split(' ').next().unwrap_or(what);
            let (target, limit) = target(lang, key);
            results.rows.push(Row {
                case: case(lang, what),
                evrhost: fmt_ns(m),
                baseline: fmt_ns(base),
                ratio: m / base,
                target,
                pass: limit.is_none_or(|l| m <= l),
            });
        }
    }
    for (k, lang) in LANGS.iter().enumerate().skip(1) {
        results.rows.push(Row {
            case: case(lang, "compile"),
            evrhost: fmt_ns(compile[k]),
            baseline: fmt_ns(compile[0]),
            ratio: compile[k] / compile[0],
            target: "reported",
            pass: true,
        });
    }
    // What a load of a new or changed file adds: reading and hashing it.
    let mut before_cache = Vec::new();
    for (lang, wasm) in LANGS.iter().zip(&components) {
        let mut t = Vec::new();
        for _ in 0..9 {
            let start = Instant::now();
            let bytes = std::fs::read(wasm)?;
            std::hint::black_box(blake3::hash(&bytes));
            t.push(start.elapsed().as_nanos() as f64);
        }
        t.sort_by(f64::total_cmp);
        before_cache.push(format!("{lang} {}", fmt_ns(median(&t))));
    }
    results.notes.push(format!(
        "a load of a new or changed file adds reading + hashing it (a reload of an unchanged one skips both): {}",
        before_cache.join(", ")
    ));
    let sizes: Vec<String> = LANGS
        .iter()
        .zip(&components)
        .map(|(l, w)| format!("{l} {} KB", std::fs::metadata(w).map_or(0, |m| m.len() >> 10)))
        .collect();
    results.notes.push(format!(
        "guest languages: baseline = the Rust echo in the same run; component sizes {}",
        sizes.join(", ")
    ));
    drop(versions);
    drop(per_call);
    drop(d);
    drop(d_pc);
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    Ok(())
}
