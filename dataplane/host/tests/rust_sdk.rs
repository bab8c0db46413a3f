//! Filters built from source with the official Rust SDK (`proxy-wasm` 0.2.5) run unmodified,
//! and each API group behaves as the SDK's users expect.

mod common;

use std::sync::Arc;

use common::*;
use wasmfilter_host::*;

#[test]
fn detects_abi_0_2_1_and_runs_the_lifecycle() {
    let module = rust_module("header_rewrite");
    assert_eq!(module.abi, AbiVersion::V0_2_1);
    assert!(module.digest.starts_with("sha256:"));
    let mut p = Setup::new(module).start();
    let ex = exchange(GET_ROOT);
    let ctx = p.vm.create_stream(p.root, ex.clone()).unwrap();
    assert_eq!(
        p.vm.on_request_headers(ctx, true).unwrap(),
        Action::Continue
    );
    ex.lock().response_headers = Fields::from_pairs([(":status", "200")]);
    assert_eq!(
        p.vm.on_response_headers(ctx, true).unwrap(),
        Action::Continue
    );
    p.vm.finish_stream(ctx).unwrap();
    assert_eq!(p.vm.stream_count(), 0);
    assert_eq!(
        get_response_header(&ex, "x-wasmfilter").as_deref(),
        Some("header_rewrite")
    );
    p.vm.stop_plugin(p.root).unwrap();
}

#[test]
fn rewrites_headers_in_both_directions_from_plugin_and_vm_configuration() {
    let config = r#"{
        "request": {"add": {"x-added": "1"}, "set": {"x-replaced": "new"}, "remove": ["x-secret"]},
        "response": {"add": {"x-resp": "yes"}, "remove": ["server"]}
    }"#;
    let mut p = Setup {
        config,
        vm_config: "vm-config-value",
        ..Setup::new(rust_module("header_rewrite"))
    }
    .start();
    let ex = exchange(&[
        (":path", "/"),
        ("x-replaced", "old"),
        ("x-replaced", "old2"),
        ("x-secret", "s"),
    ]);
    let ctx = p.vm.create_stream(p.root, ex.clone()).unwrap();
    p.vm.on_request_headers(ctx, true).unwrap();
    {
        let e = ex.lock();
        assert_eq!(e.request_headers.get_str("x-added").as_deref(), Some("1"));
        assert_eq!(e.request_headers.get_joined("x-replaced").unwrap(), b"new");
        assert!(e.request_headers.get("x-secret").is_none());
    }
    ex.lock().response_headers = Fields::from_pairs([(":status", "200"), ("server", "upstream")]);
    p.vm.on_response_headers(ctx, false).unwrap();
    let e = ex.lock();
    assert_eq!(e.response_headers.get_str("x-resp").as_deref(), Some("yes"));
    assert!(e.response_headers.get("server").is_none());
    assert_eq!(
        e.response_headers.get_str("x-vm-config").as_deref(),
        Some("vm-config-value")
    );
}

#[test]
fn logs_arrive_at_every_level_and_respect_the_configured_level() {
    let p = Setup::new(rust_module("header_rewrite")).start();
    for level in [
        LogLevel::Trace,
        LogLevel::Debug,
        LogLevel::Info,
        LogLevel::Warn,
        LogLevel::Error,
    ] {
        let text = format!("header_rewrite configured ({})", level.as_str());
        assert!(
            p.logs.contains(level, &text),
            "missing {text:?} in {:?}",
            p.logs.messages()
        );
    }
    let quiet = Setup {
        log_level: LogLevel::Warn,
        ..Setup::new(rust_module("header_rewrite"))
    }
    .start();
    let levels: Vec<LogLevel> = quiet.logs.messages().iter().map(|(l, _)| *l).collect();
    assert!(levels.contains(&LogLevel::Warn) && levels.contains(&LogLevel::Error));
    assert!(!levels.iter().any(|l| *l < LogLevel::Warn), "{levels:?}");
}

#[test]
fn invalid_plugin_configuration_is_rejected_by_on_configure() {
    let logs = Logs::default();
    let mut vm = host()
        .new_vm(
            &rust_module("header_rewrite"),
            VmOptions {
                log: logs.sink(),
                ..Default::default()
            },
        )
        .unwrap();
    let err = vm
        .start_plugin(PluginSpec {
            name: "bad".into(),
            configuration: b"{not json".to_vec().into(),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(err, StartError::ConfigureRejected(_)), "{err}");
    // The refusal carries the module's own explanation, for the operator's status.
    assert!(
        err.to_string().contains("invalid plugin configuration"),
        "{err}"
    );
    assert!(
        logs.contains(LogLevel::Error, "invalid plugin configuration"),
        "{:?}",
        logs.messages()
    );
}

#[test]
fn local_reply_carries_status_headers_body_and_response_callbacks_still_run() {
    let mut p = Setup::new(rust_module("local_reply")).start();
    let ex = exchange(&[(":method", "GET"), (":path", "/deny/me")]);
    let ctx = p.vm.create_stream(p.root, ex.clone()).unwrap();
    assert_eq!(p.vm.on_request_headers(ctx, true).unwrap(), Action::Pause);
    let effects = p.vm.take_effects();
    let reply = effects
        .iter()
        .find_map(|e| match e {
            Effect::LocalResponse {
                context_id,
                response,
            } if *context_id == ctx => Some(response.clone()),
            _ => None,
        })
        .expect("a local reply");
    assert_eq!(reply.status, 403);
    assert_eq!(reply.body, b"denied\n");
    assert_eq!(
        reply.headers.get_str("x-denied-by").as_deref(),
        Some("local_reply")
    );
    assert_eq!(reply.grpc_status, None);
    // The embedder turns the reply into response headers and runs the response side on it.
    ex.lock().response_headers = Fields::from_pairs([(":status", "403")]);
    p.vm.on_response_headers(ctx, false).unwrap();
    assert_eq!(
        get_response_header(&ex, "x-local-reply-seen").as_deref(),
        Some("403")
    );

    let ex2 = exchange(&[(":path", "/ok")]);
    let ctx2 = p.vm.create_stream(p.root, ex2).unwrap();
    assert_eq!(
        p.vm.on_request_headers(ctx2, true).unwrap(),
        Action::Continue
    );
    assert!(p.vm.take_effects().is_empty());
}

#[test]
fn grpc_local_reply_and_close_stream() {
    let mut p = Setup {
        config: r#"{"grpc": true}"#,
        ..Setup::new(rust_module("local_reply"))
    }
    .start();
    let ctx =
        p.vm.create_stream(p.root, exchange(&[(":path", "/deny")]))
            .unwrap();
    p.vm.on_request_headers(ctx, true).unwrap();
    match p.vm.take_effects().as_slice() {
        [Effect::LocalResponse { response, .. }] => {
            assert_eq!(response.status, 200);
            assert_eq!(response.grpc_status, Some(7));
        }
        other => panic!("expected one local reply, got {other:?}"),
    }
    let ctx =
        p.vm.create_stream(p.root, exchange(&[(":path", "/x"), ("x-close", "1")]))
            .unwrap();
    assert_eq!(p.vm.on_request_headers(ctx, true).unwrap(), Action::Pause);
    assert!(matches!(
        p.vm.take_effects().as_slice(),
        [Effect::CloseStream {
            stream: StreamType::Request,
            ..
        }]
    ));
}

#[test]
fn bodies_are_buffered_cumulatively_and_rewritten_and_trailers_added() {
    let mut p = Setup {
        config: r#"{"from": "hello", "to": "HELLO"}"#,
        ..Setup::new(rust_module("body_rewrite"))
    }
    .start();
    let ex = exchange(&[
        (":method", "POST"),
        (":path", "/"),
        ("content-length", "17"),
    ]);
    let ctx = p.vm.create_stream(p.root, ex.clone()).unwrap();
    p.vm.on_request_headers(ctx, false).unwrap();
    assert!(ex.lock().request_headers.get("content-length").is_none());
    // First chunk: the filter pauses, the embedder keeps buffering.
    ex.lock().request_body = b"say hel".to_vec();
    assert_eq!(p.vm.on_request_body(ctx, false).unwrap(), Action::Pause);
    // Cumulative body on the next call, split across the match.
    ex.lock().request_body.extend_from_slice(b"lo, hello!");
    assert_eq!(p.vm.on_request_body(ctx, true).unwrap(), Action::Continue);
    assert_eq!(ex.lock().request_body, b"say HELLO, HELLO!");

    ex.lock().request_trailers = Fields::from_pairs([("x-client-trailer", "1")]);
    p.vm.on_request_trailers(ctx).unwrap();
    assert_eq!(
        ex.lock()
            .request_trailers
            .get_str("x-filter-trailer")
            .as_deref(),
        Some("seen")
    );

    ex.lock().response_headers = Fields::from_pairs([(":status", "200"), ("content-length", "11")]);
    p.vm.on_response_headers(ctx, false).unwrap();
    ex.lock().response_body = b"hello world".to_vec();
    assert_eq!(p.vm.on_response_body(ctx, false).unwrap(), Action::Pause);
    ex.lock().response_trailers = Fields::from_pairs([("grpc-status", "0")]);
    p.vm.on_response_trailers(ctx).unwrap();
    assert_eq!(
        ex.lock()
            .response_trailers
            .get_str("x-response-body-bytes")
            .as_deref(),
        Some("11")
    );
}

#[test]
fn http_callout_pauses_then_resumes_with_data_from_the_response() {
    let mut p = Setup {
        clusters: &["auth"],
        ..Setup::new(rust_module("callout"))
    }
    .start();
    let ex = exchange(&[
        (":method", "GET"),
        (":path", "/private"),
        ("authorization", "Bearer t"),
    ]);
    let ctx = p.vm.create_stream(p.root, ex.clone()).unwrap();
    assert_eq!(p.vm.on_request_headers(ctx, true).unwrap(), Action::Pause);
    let call = match p.vm.take_effects().as_slice() {
        [Effect::HttpCall(call)] => call.clone(),
        other => panic!("expected one callout, got {other:?}"),
    };
    assert_eq!(call.cluster, "auth");
    assert_eq!(call.root_context_id, p.root);
    assert_eq!(call.origin_context_id, ctx);
    assert_eq!(call.headers.get_str(":path").as_deref(), Some("/check"));
    assert_eq!(
        call.headers.get_str("x-original-path").as_deref(),
        Some("/private")
    );
    assert_eq!(
        call.headers.get_str("authorization").as_deref(),
        Some("Bearer t")
    );
    assert_eq!(call.timeout, Some(std::time::Duration::from_millis(1000)));

    let response = HttpCallResponse {
        headers: Fields::from_pairs([(":status", "200"), ("x-user", "alice")]),
        body: b"ok".to_vec(),
        trailers: Fields::new(),
    };
    p.vm.on_http_call_response(call.token, Some(response))
        .unwrap();
    assert_eq!(
        get_request_header(&ex, "x-auth-user").as_deref(),
        Some("alice")
    );
    assert_eq!(
        get_request_header(&ex, "x-callout-body-bytes").as_deref(),
        Some("2")
    );
    assert!(matches!(
        p.vm.take_effects().as_slice(),
        [Effect::ContinueStream { context_id, stream: StreamType::Request }] if *context_id == ctx
    ));
}

#[test]
fn failed_and_denied_callouts_become_local_replies() {
    let mut p = Setup {
        clusters: &["auth"],
        ..Setup::new(rust_module("callout"))
    }
    .start();
    for (response, status) in [
        (None, 503),
        (
            Some(HttpCallResponse {
                headers: Fields::from_pairs([(":status", "401")]),
                ..Default::default()
            }),
            403,
        ),
    ] {
        let ctx =
            p.vm.create_stream(p.root, exchange(&[(":path", "/")]))
                .unwrap();
        p.vm.on_request_headers(ctx, true).unwrap();
        let Some(Effect::HttpCall(call)) = p.vm.take_effects().pop() else {
            panic!("no callout")
        };
        p.vm.on_http_call_response(call.token, response).unwrap();
        match p.vm.take_effects().as_slice() {
            [Effect::LocalResponse { response, .. }] => assert_eq!(response.status, status),
            other => panic!("expected a local reply, got {other:?}"),
        }
    }
}

#[test]
fn callout_to_an_unknown_cluster_is_refused_at_dispatch() {
    let mut p = Setup {
        clusters: &[],
        ..Setup::new(rust_module("callout"))
    }
    .start();
    let ctx =
        p.vm.create_stream(p.root, exchange(&[(":path", "/")]))
            .unwrap();
    assert_eq!(p.vm.on_request_headers(ctx, true).unwrap(), Action::Pause);
    match p.vm.take_effects().as_slice() {
        [Effect::LocalResponse { response, .. }] => {
            assert_eq!(response.status, 500);
            assert_eq!(
                response.headers.get_str("x-callout-error").as_deref(),
                Some("dispatch")
            );
        }
        other => panic!("expected the filter's dispatch-error reply, got {other:?}"),
    }
    assert!(p.logs.contains(LogLevel::Warn, "no cluster named \"auth\""));
    assert!(p.vm.failure().is_none());
}

#[test]
fn grpc_callout_delivers_message_and_status_to_the_stream() {
    let config =
        r#"{"grpc_cluster": "grpc-backend", "grpc_service": "test.Echo", "grpc_method": "Check"}"#;
    let mut p = Setup {
        config,
        clusters: &["grpc-backend"],
        ..Setup::new(rust_module("callout"))
    }
    .start();
    let ex = exchange(&[(":path", "/hello")]);
    let ctx = p.vm.create_stream(p.root, ex.clone()).unwrap();
    assert_eq!(p.vm.on_request_headers(ctx, true).unwrap(), Action::Pause);
    let call = match p.vm.take_effects().as_slice() {
        [Effect::GrpcCall(call)] => call.clone(),
        other => panic!("expected a gRPC call, got {other:?}"),
    };
    assert_eq!(
        (call.service.as_str(), call.method.as_str()),
        ("test.Echo", "Check")
    );
    assert_eq!(call.message.as_deref(), Some(&b"/hello"[..]));
    assert_eq!(call.initial_metadata.get_str("x-md").as_deref(), Some("1"));
    p.vm.on_grpc_initial_metadata(
        call.token,
        Fields::from_pairs([("content-type", "application/grpc")]),
    )
    .unwrap();
    p.vm.on_grpc_message(call.token, b"pong".to_vec()).unwrap();
    assert_eq!(
        get_request_header(&ex, "x-grpc-status").as_deref(),
        Some("0")
    );
    assert_eq!(
        get_request_header(&ex, "x-grpc-response").as_deref(),
        Some("pong")
    );
    p.vm.on_grpc_close(call.token, 0, "").unwrap();
    assert!(
        p.vm.take_effects()
            .iter()
            .any(|e| matches!(e, Effect::ContinueStream { .. }))
    );
}

#[test]
fn metrics_of_all_three_kinds_with_tags_in_names() {
    let mut p = Setup::new(rust_module("observe")).start();
    let mut live = Vec::new();
    for method in ["GET", "GET", "POST"] {
        let ex = exchange(&[(":method", method), (":path", "/m"), ("a", "1")]);
        let ctx = p.vm.create_stream(p.root, ex).unwrap();
        p.vm.on_request_headers(ctx, true).unwrap();
        live.push(ctx);
    }
    assert_eq!(p.metrics.find("observe_active_streams").unwrap().value, 3);
    for ctx in live {
        p.vm.finish_stream(ctx).unwrap();
    }
    let m = &p.metrics;
    assert_eq!(m.find("observe_requests_total").unwrap().value, 3);
    assert_eq!(m.find("observe_active_streams").unwrap().value, 0);
    let hist = m.find("observe_request_header_count").unwrap();
    assert_eq!(
        (hist.kind, hist.value, hist.sum),
        (MetricType::Histogram, 3, 9)
    );
    let get = m.find("observe_requests_by_method.method=GET").unwrap();
    assert_eq!(get.name, "observe_requests_by_method");
    assert_eq!(get.labels, vec![("method".to_string(), "GET".to_string())]);
    assert_eq!(get.value, 2);
    assert_eq!(
        m.find("observe_requests_by_method.method=POST")
            .unwrap()
            .value,
        1
    );
}

#[test]
fn properties_answer_well_known_names_and_set_property_roundtrips() {
    let mut p = Setup {
        name: "observer",
        vm_id: "vm-props",
        root_id: "",
        ..Setup::new(rust_module("observe"))
    }
    .start();
    let ex = exchange(&[(":method", "PUT"), (":path", "/p?q=1")]);
    {
        let mut e = ex.lock();
        e.info.source_address = Some("127.0.0.1:5555".parse().unwrap());
        e.info.route_name = Some("route-a".into());
        e.info.route_metadata = Some(PropertyValue::from_json(&serde_json::json!({
            "filter_metadata": {"wasmfilter": {"owner": "team-x"}}
        })));
    }
    let ctx = p.vm.create_stream(p.root, ex.clone()).unwrap();
    p.vm.on_request_headers(ctx, true).unwrap();
    let h = |n: &str| get_request_header(&ex, n).unwrap_or_else(|| panic!("{n} missing"));
    assert_eq!(h("x-prop-plugin-name"), "observer");
    assert_eq!(
        h("x-prop-root-id"),
        "<none>",
        "an empty root id reads as no data"
    );
    assert_eq!(h("x-prop-vm-id"), "vm-props");
    assert_eq!(h("x-prop-path"), "/p?q=1");
    assert_eq!(h("x-prop-method"), "PUT");
    assert_eq!(h("x-prop-source-address"), "127.0.0.1:5555");
    assert_eq!(h("x-prop-route-name"), "route-a");
    assert_eq!(h("x-prop-route-meta-owner"), "team-x");
    assert_eq!(h("x-prop-set-roundtrip"), "yes");
    let levels: Vec<LogLevel> = p
        .logs
        .messages()
        .into_iter()
        .filter(|(_, m)| m.starts_with("observe request ("))
        .map(|(l, _)| l)
        .collect();
    assert_eq!(levels.len(), 6, "one line per level: {levels:?}");
    assert!(levels.contains(&LogLevel::Critical));
}

#[test]
fn effective_context_routes_a_callout_answer_to_the_stream_that_made_it() {
    let mut p = Setup {
        clusters: &["side"],
        ..Setup::new(rust_module("observe"))
    }
    .start();
    let first = exchange(&[(":path", "/1"), ("x-observe-callout-cluster", "side")]);
    let second = exchange(&[(":path", "/2"), ("x-observe-callout-cluster", "side")]);
    let c1 = p.vm.create_stream(p.root, first.clone()).unwrap();
    let c2 = p.vm.create_stream(p.root, second.clone()).unwrap();
    assert_eq!(p.vm.on_request_headers(c1, true).unwrap(), Action::Pause);
    assert_eq!(p.vm.on_request_headers(c2, true).unwrap(), Action::Pause);
    let calls: Vec<HttpCallout> =
        p.vm.take_effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::HttpCall(c) => Some(c),
                _ => None,
            })
            .collect();
    assert_eq!(calls.len(), 2);
    // Answer the second stream's call first.
    let ok = |status: &str| HttpCallResponse {
        headers: Fields::from_pairs([(":status", status)]),
        ..Default::default()
    };
    p.vm.on_http_call_response(calls[1].token, Some(ok("202")))
        .unwrap();
    p.vm.on_http_call_response(calls[0].token, Some(ok("201")))
        .unwrap();
    assert_eq!(
        get_request_header(&first, "x-observe-callout-status").as_deref(),
        Some("201")
    );
    assert_eq!(
        get_request_header(&second, "x-observe-callout-status").as_deref(),
        Some("202")
    );
}

#[test]
fn tick_period_is_reported_and_ticks_reach_the_root_context() {
    let mut p = Setup {
        config: r#"{"tick_ms": 25}"#,
        vm_id: "vm-tick",
        ..Setup::new(rust_module("observe"))
    }
    .start();
    assert!(p.vm.take_effects().iter().any(|e| matches!(
        e,
        Effect::TickPeriod { root_context_id, period: Some(d) } if *root_context_id == p.root && d.as_millis() == 25
    )));
    for _ in 0..3 {
        p.vm.on_tick(p.root).unwrap();
    }
    assert_eq!(p.metrics.find("observe_ticks_total").unwrap().value, 3);
    assert_eq!(
        host().shared().get("vm-tick", "observe.ticks").unwrap().0,
        b"3"
    );
}

#[test]
fn shared_data_cas_holds_under_contention_between_vms_on_two_threads() {
    const PER_THREAD: usize = 300;
    let vm_id = "vm-cas";
    let handles: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let mut p = Setup {
                    vm_id,
                    ..Setup::new(rust_module("observe"))
                }
                .start();
                let mut retries = 0u64;
                for _ in 0..PER_THREAD {
                    let ex = exchange(&[(":path", "/")]);
                    let ctx = p.vm.create_stream(p.root, ex.clone()).unwrap();
                    p.vm.on_request_headers(ctx, true).unwrap();
                    retries += get_request_header(&ex, "x-observe-cas-retries")
                        .unwrap()
                        .parse::<u64>()
                        .unwrap();
                    assert_ne!(
                        get_request_header(&ex, "x-observe-hits").as_deref(),
                        Some("cas-exhausted")
                    );
                    p.vm.finish_stream(ctx).unwrap();
                }
                retries
            })
        })
        .collect();
    let retries: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let (value, _) = host().shared().get(vm_id, "observe.hits").unwrap();
    assert_eq!(
        String::from_utf8(value).unwrap(),
        (2 * PER_THREAD).to_string(),
        "no increment lost"
    );
    eprintln!("CAS retries under contention: {retries}");
}

#[test]
fn shared_queue_carries_items_between_two_vms() {
    let vm_id = "vm-queue";
    let mut consumer = Setup {
        config: r#"{"queue_role": "consumer", "queue_name": "events"}"#,
        vm_id,
        ..Setup::new(rust_module("observe"))
    }
    .start();
    let mut producer = Setup {
        config: r#"{"queue_role": "producer", "queue_name": "events"}"#,
        vm_id,
        ..Setup::new(rust_module("observe"))
    }
    .start();
    for path in ["/a", "/b"] {
        let ctx = producer
            .vm
            .create_stream(producer.root, exchange(&[(":path", path)]))
            .unwrap();
        producer.vm.on_request_headers(ctx, true).unwrap();
        producer.vm.finish_stream(ctx).unwrap();
    }
    let ready = consumer.embedder.queue_ready.lock().clone();
    assert_eq!(
        ready.len(),
        2,
        "one notification per enqueue, to the consumer's embedder"
    );
    assert_eq!(ready[0].vm_instance, consumer.vm.instance_id());
    assert_eq!(ready[0].root_context_id, consumer.root);
    consumer
        .vm
        .on_queue_ready(ready[0].root_context_id, ready[0].queue_id)
        .unwrap();
    assert!(consumer.logs.contains(LogLevel::Info, "dequeued: /a"));
    assert!(consumer.logs.contains(LogLevel::Info, "dequeued: /b"));
    assert_eq!(
        consumer
            .metrics
            .find("observe_dequeued_total")
            .unwrap()
            .value,
        2
    );
    assert_eq!(
        host().shared().get(vm_id, "observe.dequeued").unwrap().0,
        b"/a,/b"
    );
}

#[test]
fn vm_sharing_gives_each_plugin_its_own_root_context() {
    let module = rust_module("header_rewrite");
    let mut vm = host()
        .new_vm(
            &module,
            VmOptions {
                vm_id: "shared-vm".into(),
                ..Default::default()
            },
        )
        .unwrap();
    let spec = |name: &str, value: &str| PluginSpec {
        name: name.into(),
        configuration: format!(r#"{{"request": {{"add": {{"x-plugin": "{value}"}}}}}}"#)
            .into_bytes()
            .into(),
        metrics: Arc::new(MetricsRegistry::default()),
        ..Default::default()
    };
    let a = vm.start_plugin(spec("a", "first")).unwrap();
    let b = vm.start_plugin(spec("b", "second")).unwrap();
    assert_ne!(a, b);
    for (root, expected) in [(a, "first"), (b, "second")] {
        let ex = exchange(&[(":path", "/")]);
        let ctx = vm.create_stream(root, ex.clone()).unwrap();
        vm.on_request_headers(ctx, true).unwrap();
        assert_eq!(
            get_request_header(&ex, "x-plugin").as_deref(),
            Some(expected)
        );
        vm.finish_stream(ctx).unwrap();
    }
}

#[test]
fn compiled_modules_are_cached_on_disk_by_digest() {
    let dir = std::env::temp_dir().join(format!("wasmfilter-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bytes = wasmfilter_testkit::rust_filter_bytes("header_rewrite").unwrap();
    let cfg = || HostConfig {
        module_cache_dir: Some(dir.clone()),
        pooling: false,
        ..Default::default()
    };
    let first = Host::new(cfg()).unwrap().load(&bytes).unwrap();
    assert!(!first.from_cache);
    let second = Host::new(cfg()).unwrap().load(&bytes).unwrap();
    assert!(
        second.from_cache,
        "the second load reuses the compiled module"
    );
    assert_eq!(first.digest, second.digest);
    let _ = std::fs::remove_dir_all(&dir);
}
