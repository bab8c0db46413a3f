//! `wasmfilter-dataplane --config FILE`: runs the proxy standalone from a YAML file.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "The wasmfilter dataplane: an HTTP reverse proxy with a chain of proxy-wasm filters"
)]
struct Args {
    /// The YAML configuration (listeners, routes, clusters, filters).
    #[arg(long, short, env = "WASMFILTER_CONFIG")]
    config: PathBuf,
    /// Check the configuration, its certificates and filters (each compiled and started in a
    /// throw-away VM) without binding a port or contacting the operator, like `nginx -t`:
    /// exit 0 with a one-line summary, else 2 with the error naming the field.
    #[arg(long)]
    check: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let logs = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "info,wasmfilter=info".into()),
    );
    if args.check {
        // Stdout is the check's one-line verdict; what loading the filters logs goes to stderr.
        logs.with_writer(std::io::stderr).init();
    } else {
        logs.init();
    }
    if args.check {
        return match wasmfilter_dataplane::reload::check(&args.config) {
            Ok(summary) => {
                println!("{summary}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    let dataplane = match wasmfilter_dataplane::Dataplane::start(&args.config) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    println!(
        "wasmfilter dataplane listening on http://{} (admin http://{})",
        dataplane.proxy_addr, dataplane.admin_addr
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("signal runtime");
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        // The file is also watched: a changed modification time reloads it, as SIGHUP does.
        let modified =
            |path: &std::path::Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut seen = modified(&args.config);
        let mut poll = tokio::time::interval(std::time::Duration::from_secs(1));
        // The outcome (applied, or refused with the fields named) is logged by the reload.
        let reload = |why: &str| {
            tracing::info!("reloading the configuration ({why})");
            let _ = dataplane.reload();
        };
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => reload("SIGHUP"),
                _ = poll.tick() => {
                    let now = modified(&args.config);
                    if now != seen {
                        seen = now;
                        reload("file changed");
                    }
                }
            }
        }
    });
    println!("draining in-flight requests");
    dataplane.shutdown();
    std::process::ExitCode::SUCCESS
}

fn fail(e: anyhow::Error) -> std::process::ExitCode {
    eprintln!("error: {e:#}");
    std::process::ExitCode::from(2)
}
