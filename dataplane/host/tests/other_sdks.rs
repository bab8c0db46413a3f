//! Filters built from source with the official Go SDK (wasip1, c-shared) and with
//! AssemblyScript (`@solo-io/proxy-runtime`) run unmodified.

mod common;

use std::sync::Arc;

use common::*;
use wasmfilter_host::*;

fn go_module(name: &str) -> Arc<PluginModule> {
    let path = wasmfilter_testkit::go_filter(name).expect("Go filter builds");
    host()
        .load(&std::fs::read(path).unwrap())
        .expect("Go filter loads")
}

fn as_module(name: &str) -> Arc<PluginModule> {
    let path =
        wasmfilter_testkit::assemblyscript_filter(name).expect("AssemblyScript filter builds");
    host()
        .load(&std::fs::read(path).unwrap())
        .expect("AssemblyScript filter loads")
}

#[test]
fn go_header_filter_with_plugin_configuration() {
    let module = go_module("headers");
    assert_eq!(module.abi, AbiVersion::V0_2_0);
    let config = r#"{"header": "x-go", "value": "gopher"}"#;
    let mut p = Setup {
        config,
        ..Setup::new(module)
    }
    .start();
    assert!(
        p.logs
            .contains(LogLevel::Info, "go headers filter configured"),
        "{:?}",
        p.logs.messages()
    );
    let ex = exchange(GET_ROOT);
    let ctx = p.vm.create_stream(p.root, ex.clone()).unwrap();
    assert_eq!(
        p.vm.on_request_headers(ctx, true).unwrap(),
        Action::Continue
    );
    assert_eq!(get_request_header(&ex, "x-go").as_deref(), Some("gopher"));
    ex.lock().response_headers = Fields::from_pairs([(":status", "200")]);
    p.vm.on_response_headers(ctx, true).unwrap();
    assert_eq!(
        get_response_header(&ex, "x-go-response").as_deref(),
        Some("gopher")
    );
    assert_eq!(
        get_response_header(&ex, "x-go-config-size").as_deref(),
        Some(config.len().to_string().as_str())
    );
    p.vm.finish_stream(ctx).unwrap();
}

#[test]
fn go_body_filter_buffers_and_rewrites() {
    let mut p = Setup {
        config: r#"{"from": "cat", "to": "dog"}"#,
        ..Setup::new(go_module("body"))
    }
    .start();
    let ex = exchange(&[
        (":method", "POST"),
        (":path", "/"),
        ("content-length", "13"),
    ]);
    let ctx = p.vm.create_stream(p.root, ex.clone()).unwrap();
    p.vm.on_request_headers(ctx, false).unwrap();
    assert!(ex.lock().request_headers.get("content-length").is_none());
    ex.lock().request_body = b"a cat, ".to_vec();
    assert_eq!(p.vm.on_request_body(ctx, false).unwrap(), Action::Pause);
    ex.lock().request_body.extend_from_slice(b"a ca");
    assert_eq!(p.vm.on_request_body(ctx, false).unwrap(), Action::Pause);
    ex.lock().request_body.extend_from_slice(b"t");
    assert_eq!(p.vm.on_request_body(ctx, true).unwrap(), Action::Continue);
    assert_eq!(ex.lock().request_body, b"a dog, a dog");
}

#[test]
fn go_http_callout_pauses_and_resumes() {
    let mut p = Setup {
        config: r#"{"cluster": "auth", "path": "/check"}"#,
        clusters: &["auth"],
        ..Setup::new(go_module("httpcall"))
    }
    .start();
    let ex = exchange(GET_ROOT);
    let ctx = p.vm.create_stream(p.root, ex.clone()).unwrap();
    assert_eq!(p.vm.on_request_headers(ctx, true).unwrap(), Action::Pause);
    let call = match p.vm.take_effects().as_slice() {
        [Effect::HttpCall(call)] => call.clone(),
        other => panic!("expected a callout, got {other:?}"),
    };
    assert_eq!(call.headers.get_str(":path").as_deref(), Some("/check"));
    p.vm.on_http_call_response(
        call.token,
        Some(HttpCallResponse {
            headers: Fields::from_pairs([(":status", "200"), ("x-user", "gopher")]),
            ..Default::default()
        }),
    )
    .unwrap();
    assert_eq!(
        get_request_header(&ex, "x-go-callout-user").as_deref(),
        Some("gopher")
    );
    assert!(matches!(
        p.vm.take_effects().as_slice(),
        [Effect::ContinueStream {
            stream: StreamType::Request,
            ..
        }]
    ));

    // A denied callout becomes the filter's 403.
    let ctx = p.vm.create_stream(p.root, exchange(GET_ROOT)).unwrap();
    p.vm.on_request_headers(ctx, true).unwrap();
    let Some(Effect::HttpCall(call)) = p.vm.take_effects().pop() else {
        panic!("no callout")
    };
    p.vm.on_http_call_response(
        call.token,
        Some(HttpCallResponse {
            headers: Fields::from_pairs([(":status", "500")]),
            ..Default::default()
        }),
    )
    .unwrap();
    match p.vm.take_effects().as_slice() {
        [Effect::LocalResponse { response, .. }] => {
            assert_eq!(response.status, 403);
            assert_eq!(
                response.headers.get_str("x-go-callout-status").as_deref(),
                Some("500")
            );
        }
        other => panic!("expected a 403, got {other:?}"),
    }
}

#[test]
fn assemblyscript_header_filter_with_plugin_configuration() {
    let module = as_module("add_header");
    let mut p = Setup {
        config: "from-config",
        root_id: "add_header",
        ..Setup::new(module)
    }
    .start();
    let ex = exchange(GET_ROOT);
    let ctx = p.vm.create_stream(p.root, ex.clone()).unwrap();
    assert_eq!(
        p.vm.on_request_headers(ctx, true).unwrap(),
        Action::Continue
    );
    assert_eq!(
        get_request_header(&ex, "x-as-request").as_deref(),
        Some("1")
    );
    ex.lock().response_headers = Fields::from_pairs([(":status", "200")]);
    p.vm.on_response_headers(ctx, true).unwrap();
    assert_eq!(
        get_response_header(&ex, "x-as-filter").as_deref(),
        Some("from-config")
    );
    p.vm.finish_stream(ctx).unwrap();
}
