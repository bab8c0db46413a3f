//! `wasmfilter-operator`: `run` (the operator: controller, gRPC control plane, admin
//! endpoints, leader election) and `push` (publish a module to a registry).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wasmfilter_operator::Credentials;
use wasmfilter_operator::oci::{PushOptions, push_wasm};

#[derive(Parser, Debug)]
#[command(
    name = "wasmfilter-operator",
    version,
    about = "The wasmfilter operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator: reconcile WasmFilters and serve dataplanes (see operator/README.md).
    Run(Box<wasmfilter_operator::run::RunArgs>),
    /// Publish a .wasm module as a CNCF Wasm OCI artifact (config
    /// application/vnd.wasm.config.v0+json, one application/wasm layer).
    Push {
        /// The module to publish.
        file: PathBuf,
        /// Where to: registry/repository:tag.
        reference: String,
        #[arg(long, env = "WASMFILTER_REGISTRY_USERNAME", requires = "password")]
        username: Option<String>,
        #[arg(long, env = "WASMFILTER_REGISTRY_PASSWORD", requires = "username")]
        password: Option<String>,
        /// Speak plain HTTP to the registry.
        #[arg(long)]
        insecure: bool,
        /// Skip the proxy-wasm module check before pushing.
        #[arg(long)]
        no_check: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The operator logs what it does (info); the push command only what goes wrong.
    let default_filter = match cli.command {
        Command::Run(_) => "info",
        Command::Push { .. } => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run(args) => rt.block_on(serve(*args)),
        Command::Push {
            file,
            reference,
            username,
            password,
            insecure,
            no_check,
        } => {
            let module = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
            if !no_check {
                wasmfilter_operator::oci::check_module(&module)?;
            }
            let title = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "module.wasm".into());
            let credentials = match (username, password) {
                (Some(u), Some(p)) => Credentials::basic(u, p),
                _ => Credentials::Anonymous,
            };
            let opts = PushOptions {
                credentials,
                insecure,
            };
            let pushed = rt.block_on(push_wasm(&reference, module, &title, &opts))?;
            println!(
                "pushed {reference}\nmanifest {}\nmodule {}",
                pushed.manifest_digest, pushed.digest
            );
            Ok(())
        }
    }
}

/// Runs the operator until SIGTERM or SIGINT (graceful stop) or the loss of the Lease (error).
async fn serve(args: wasmfilter_operator::run::RunArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate())?;
    let operator = wasmfilter_operator::run::Operator::start(args).await?;
    tracing::info!(admin = %operator.admin_addr(), "operator started");
    let stop = async {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let stopper = operator.stopper();
    let mut wait = std::pin::pin!(operator.wait());
    tokio::select! {
        result = &mut wait => return result,
        _ = stop => tracing::info!("stopping"),
    }
    stopper.stop();
    wait.await
}
