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
    /// Check the configuration (and compile and start every filter) without serving.
    #[arg(long)]
    check: bool,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wasmfilter=info".into()),
        )
        .init();
    let args = Args::parse();
    if args.check {
        return match wasmfilter_dataplane::config::Config::load(&args.config) {
            Ok(_) => match wasmfilter_dataplane::Dataplane::start(&args.config) {
                Ok(dp) => {
                    println!("{}: configuration OK", args.config.display());
                    dp.shutdown();
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            },
            Err(e) => fail(e.into()),
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
        let reload = |why: &str| match dataplane.reload() {
            Ok(()) => println!("configuration reloaded ({why})"),
            Err(e) => eprintln!("reload refused, the running configuration stays: {e:#}"),
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
