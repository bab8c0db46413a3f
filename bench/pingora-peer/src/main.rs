//! The Pingora peer of `cargo xtask bench` (performance-anchors.md §7.1): a minimal reverse
//! proxy built on `pingora-proxy`, configured like the other peers — one worker thread (no work
//! stealing), upstream keepalive (Pingora's connection pool), no logs (no logger is installed,
//! so `log` calls are dropped).
//!
//!     pingora-peer LISTEN UPSTREAM PIDFILE    # e.g. 127.0.0.1:18081 127.0.0.1:18080 /tmp/p.pid

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Forward {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Forward {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        // Plain HTTP/1.1 to the backend; Pingora reuses the connection from its pool.
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, pid_file] = args.as_slice() else {
        eprintln!("usage: pingora-peer LISTEN UPSTREAM PIDFILE");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        pid_file: pid_file.clone(),
        upgrade_sock: format!("{pid_file}.sock"),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Forward {
            upstream: upstream.clone(),
        },
    );
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
