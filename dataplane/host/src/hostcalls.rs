//! The `env` hostcalls of the proxy-wasm ABI (the union of 0.1.0, 0.2.0 and 0.2.1).
//!
//! Each hostcall decodes its arguments from guest memory (checked), delegates to the VM state,
//! the stream's exchange or the shared state, and returns a status. Statuses stay within what
//! every SDK accepts for that call (proxy-wasm-abi.md §7); a guest that breaks the ABI's rules
//! outright (a hostcall from inside its allocator) gets a trap, not a status.

use std::time::{Duration, SystemTime};

use wasmtime::{Caller, Linker};

use crate::abi::{BufferType, LogLevel, MapType, MetricType, Status, StreamType};
use crate::exchange::{Effect, GrpcCallout, HttpCallout, LocalResponse};
use crate::limits::{MAX_GUEST_BUFFER_BYTES, MAX_LOG_MESSAGE_BYTES, MAX_PAIRS_BYTES};
use crate::memory::{
    HostError, HostResult, check_range, copy_out, finish, read_bytes, read_string, write_u32,
    write_u64,
};
use crate::metrics::MetricError;
use crate::pairs::{self, Fields, MapRole};
use crate::properties::{self, Lookup, PropertyScope};
use crate::quota::Limit;
use crate::shared::{QueueOwner, SetError};
use crate::state::{PendingCallout, Phase, VmState};

type C<'a> = Caller<'a, VmState>;

/// Refuses hostcalls the guest may not make right now: anything but logging while its
/// allocator runs (cpp-host's "restricted callbacks").
fn guard(c: &C<'_>, name: &str) -> HostResult {
    if c.data().allocating {
        return Err(HostError::Trap(wasmtime::format_err!(
            "the module called {name} from inside its memory allocator; only proxy_log is allowed there"
        )));
    }
    Ok(())
}

fn bad<T>() -> HostResult<T> {
    Err(Status::BadArgument.into())
}

pub(crate) fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    macro_rules! hostcall {
        ($name:literal, |$c:ident $(, $arg:ident : $ty:ty)*| $body:expr) => {
            linker.func_wrap("env", $name, |mut $c: C<'_> $(, $arg: $ty)*| -> wasmtime::Result<i32> {
                #[allow(unused_mut)]
                let mut $c = &mut $c;
                finish((|| -> HostResult { $body })())
            })?;
        };
    }

    // ---- logging and time -------------------------------------------------------------
    hostcall!("proxy_log", |c, level: i32, ptr: i32, len: i32| {
        let level = LogLevel::from_i32(level).ok_or(Status::BadArgument)?;
        let mut msg = read_bytes(c, ptr, len, MAX_GUEST_BUFFER_BYTES)?;
        if msg.len() > MAX_LOG_MESSAGE_BYTES {
            msg.truncate(MAX_LOG_MESSAGE_BYTES);
            msg.extend_from_slice("…[truncated]".as_bytes());
        }
        c.data()
            .emit_log(level, String::from_utf8_lossy(&msg).into_owned());
        Ok(())
    });
    hostcall!("proxy_get_log_level", |c, ret: i32| {
        let level = c.data().log_level as u32;
        write_u32(c, ret, level)?;
        Ok(())
    });
    hostcall!("proxy_get_current_time_nanoseconds", |c, ret: i32| {
        guard(c, "proxy_get_current_time_nanoseconds")?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        write_u64(c, ret, now)?;
        Ok(())
    });
    hostcall!("proxy_set_tick_period_milliseconds", |c, period: i32| {
        guard(c, "proxy_set_tick_period_milliseconds")?;
        let s = c.data_mut();
        let root = s
            .active_context()
            .and_then(|ctx| s.root_of(ctx))
            .ok_or(Status::BadArgument)?;
        let period = (period != 0).then(|| Duration::from_millis(period as u32 as u64));
        s.effects.push(Effect::TickPeriod {
            root_context_id: root,
            period,
        });
        Ok(())
    });

    // ---- contexts ---------------------------------------------------------------------
    hostcall!("proxy_set_effective_context", |c, ctx: i32| {
        guard(c, "proxy_set_effective_context")?;
        let s = c.data_mut();
        let ctx = ctx as u32;
        if !s.roots.contains_key(&ctx) && !s.streams.contains_key(&ctx) {
            return bad();
        }
        s.effective = Some(ctx);
        Ok(())
    });
    hostcall!("proxy_done", |c| {
        guard(c, "proxy_done")?;
        let s = c.data_mut();
        let ctx = s.active_context().ok_or(Status::NotFound)?;
        match s.streams.get_mut(&ctx) {
            Some(stream) if stream.done_pending => {
                stream.done_pending = false;
                s.effects.push(Effect::Done { context_id: ctx });
                Ok(())
            }
            _ => Err(Status::NotFound.into()),
        }
    });

    // ---- buffers ----------------------------------------------------------------------
    hostcall!(
        "proxy_get_buffer_bytes",
        |c, buf: i32, start: i32, max: i32, ret_ptr: i32, ret_len: i32| {
            guard(c, "proxy_get_buffer_bytes")?;
            let kind = BufferType::from_i32(buf).ok_or(Status::BadArgument)?;
            let start = start as u32 as usize;
            let max = max as u32 as usize;
            let slice = with_buffer(c.data(), kind, |b| {
                let from = start.min(b.len());
                let to = from.saturating_add(max).min(b.len());
                b[from..to].to_vec()
            })?;
            copy_out(c, &slice, ret_ptr, ret_len)
        }
    );
    hostcall!(
        "proxy_get_buffer_status",
        |c, buf: i32, ret_len: i32, ret_flags: i32| {
            guard(c, "proxy_get_buffer_status")?;
            let kind = BufferType::from_i32(buf).ok_or(Status::BadArgument)?;
            let len = with_buffer(c.data(), kind, |b| b.len())?;
            write_u32(c, ret_len, len as u32)?;
            write_u32(c, ret_flags, 0)?;
            Ok(())
        }
    );
    hostcall!(
        "proxy_set_buffer_bytes",
        |c, buf: i32, start: i32, size: i32, ptr: i32, len: i32| {
            guard(c, "proxy_set_buffer_bytes")?;
            let kind = BufferType::from_i32(buf).ok_or(Status::BadArgument)?;
            let data = read_bytes(c, ptr, len, MAX_GUEST_BUFFER_BYTES)?;
            let stream = c.data().active_stream().ok_or(Status::NotFound)?;
            let mut ex = stream.exchange.lock();
            let target = match kind {
                BufferType::HttpRequestBody => &mut ex.request_body,
                BufferType::HttpResponseBody => &mut ex.response_body,
                BufferType::DownstreamData => &mut ex.downstream_data,
                BufferType::UpstreamData => &mut ex.upstream_data,
                _ => return Err(Status::BadArgument.into()),
            };
            // start=0,size=0 prepends; start>=len appends; otherwise [start, start+size) is replaced.
            let start = (start as u32 as usize).min(target.len());
            let end = start.saturating_add(size as u32 as usize).min(target.len());
            // A filter may rewrite a body of any size, but not grow one past
            // MAX_BODY_BYTES_GROWN: repeated appends would otherwise grow the host without bound.
            let after = target.len() - (end - start) + data.len();
            if after > target.len() && after > crate::limits::MAX_BODY_BYTES_GROWN {
                drop(ex);
                c.data().emit_log(
                    LogLevel::Warn,
                    format!(
                        "proxy_set_buffer_bytes refused with BAD_ARGUMENT: the buffer would hold {after} bytes, over the {} a filter may grow it to",
                        crate::limits::MAX_BODY_BYTES_GROWN
                    ),
                );
                return bad();
            }
            target.splice(start..end, data);
            Ok(())
        }
    );

    // ---- header maps ------------------------------------------------------------------
    hostcall!(
        "proxy_get_header_map_pairs",
        |c, map: i32, ret_ptr: i32, ret_len: i32| {
            guard(c, "proxy_get_header_map_pairs")?;
            let kind = MapType::from_i32(map).ok_or(Status::BadArgument)?;
            let bytes = with_map(c.data(), kind, pairs::serialize)?;
            copy_out(c, &bytes, ret_ptr, ret_len)
        }
    );
    hostcall!(
        "proxy_set_header_map_pairs",
        |c, map: i32, ptr: i32, len: i32| {
            guard(c, "proxy_set_header_map_pairs")?;
            let kind = MapType::from_i32(map).ok_or(Status::BadArgument)?;
            let fields = read_map(c, "proxy_set_header_map_pairs", role_of(kind), ptr, len)?;
            with_map_mut(c.data(), kind, |m| {
                *m = fields;
                Ok(())
            })
        }
    );
    hostcall!(
        "proxy_get_header_map_value",
        |c, map: i32, kptr: i32, klen: i32, ret_ptr: i32, ret_len: i32| {
            guard(c, "proxy_get_header_map_value")?;
            let kind = MapType::from_i32(map).ok_or(Status::BadArgument)?;
            let key = read_string(c, kptr, klen, MAX_PAIRS_BYTES)?;
            let value = with_map(c.data(), kind, |m| m.get(&key).map(<[u8]>::to_vec))?;
            match value {
                Some(v) => copy_out(c, &v, ret_ptr, ret_len),
                // 0.1.0 answered a missing key with an empty value.
                None if c.data().abi == crate::AbiVersion::V0_1_0 => {
                    copy_out(c, &[], ret_ptr, ret_len)
                }
                None => Err(Status::NotFound.into()),
            }
        }
    );
    hostcall!(
        "proxy_add_header_map_value",
        |c, map: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| {
            guard(c, "proxy_add_header_map_value")?;
            let kind = MapType::from_i32(map).ok_or(Status::BadArgument)?;
            let key = read_string(c, kptr, klen, MAX_PAIRS_BYTES)?.to_ascii_lowercase();
            let value = read_bytes(c, vptr, vlen, MAX_PAIRS_BYTES)?;
            let call = "proxy_add_header_map_value";
            let s = c.data();
            check_one(s, call, role_of(kind), &key, &value)?;
            with_map_mut(s, kind, |m| {
                let bytes = m.byte_size() + key.len() + value.len();
                check_map_size(s, call, m.len() + 1, bytes)?;
                m.add(&key, value);
                Ok(())
            })
        }
    );
    hostcall!(
        "proxy_replace_header_map_value",
        |c, map: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| {
            guard(c, "proxy_replace_header_map_value")?;
            let kind = MapType::from_i32(map).ok_or(Status::BadArgument)?;
            let key = read_string(c, kptr, klen, MAX_PAIRS_BYTES)?.to_ascii_lowercase();
            let value = read_bytes(c, vptr, vlen, MAX_PAIRS_BYTES)?;
            let call = "proxy_replace_header_map_value";
            let s = c.data();
            check_one(s, call, role_of(kind), &key, &value)?;
            with_map_mut(s, kind, |m| {
                let (size, len) = (m.byte_size(), m.len());
                let old: usize = m
                    .iter()
                    .filter(|(k, _)| *k == key)
                    .map(|(k, v)| k.len() + v.len())
                    .sum();
                let count = len + usize::from(old == 0);
                let bytes = size - old + key.len() + value.len();
                if count > len || bytes > size {
                    check_map_size(s, call, count, bytes)?;
                }
                m.set(&key, value);
                Ok(())
            })
        }
    );
    hostcall!(
        "proxy_remove_header_map_value",
        |c, map: i32, kptr: i32, klen: i32| {
            guard(c, "proxy_remove_header_map_value")?;
            let kind = MapType::from_i32(map).ok_or(Status::BadArgument)?;
            let key = read_string(c, kptr, klen, MAX_PAIRS_BYTES)?;
            with_map_mut(c.data(), kind, |m| {
                m.remove(&key);
                Ok(())
            })
        }
    );
    hostcall!("proxy_get_header_map_size", |c, map: i32, ret: i32| {
        guard(c, "proxy_get_header_map_size")?;
        let kind = MapType::from_i32(map).ok_or(Status::BadArgument)?;
        let size = with_map(c.data(), kind, |m| m.byte_size())?;
        write_u32(c, ret, size as u32)?;
        Ok(())
    });

    // ---- stream control ---------------------------------------------------------------
    hostcall!("proxy_continue_stream", |c, stream: i32| {
        guard(c, "proxy_continue_stream")?;
        let stream = StreamType::from_i32(stream).ok_or(Status::BadArgument)?;
        stream_effect(c.data_mut(), |context_id| Effect::ContinueStream {
            context_id,
            stream,
        })
    });
    hostcall!("proxy_close_stream", |c, stream: i32| {
        guard(c, "proxy_close_stream")?;
        let stream = StreamType::from_i32(stream).ok_or(Status::BadArgument)?;
        stream_effect(c.data_mut(), |context_id| Effect::CloseStream {
            context_id,
            stream,
        })
    });
    hostcall!("proxy_continue_request", |c| {
        guard(c, "proxy_continue_request")?;
        stream_effect(c.data_mut(), |context_id| Effect::ContinueStream {
            context_id,
            stream: StreamType::Request,
        })
    });
    hostcall!("proxy_continue_response", |c| {
        guard(c, "proxy_continue_response")?;
        stream_effect(c.data_mut(), |context_id| Effect::ContinueStream {
            context_id,
            stream: StreamType::Response,
        })
    });
    hostcall!("proxy_clear_route_cache", |c| {
        guard(c, "proxy_clear_route_cache")?;
        stream_effect(c.data_mut(), |context_id| Effect::ClearRouteCache {
            context_id,
        })
    });
    hostcall!(
        "proxy_send_local_response",
        |c,
         status: i32,
         dptr: i32,
         dlen: i32,
         bptr: i32,
         blen: i32,
         hptr: i32,
         hlen: i32,
         grpc: i32| {
            let call = "proxy_send_local_response";
            guard(c, call)?;
            let details = read_string(c, dptr, dlen, MAX_PAIRS_BYTES)?;
            let body_len = check_range(c, bptr, blen)?;
            let max_body = c.data().quotas.local_reply_bytes;
            if body_len > max_body {
                c.data().refuse(
                    Limit::LocalReplyBytes,
                    format!("{call} refused with BAD_ARGUMENT: a {body_len}-byte body"),
                );
                return bad();
            }
            let body = read_bytes(c, bptr, blen, max_body)?;
            let headers = read_map(c, call, MapRole::ResponseHeaders, hptr, hlen)?;
            let status = u16::try_from(status)
                .ok()
                .filter(|s| (100..=599).contains(s))
                .ok_or(Status::BadArgument)?;
            let response = LocalResponse {
                status,
                details,
                body,
                headers,
                grpc_status: u32::try_from(grpc).ok(),
            };
            stream_effect(c.data_mut(), |context_id| Effect::LocalResponse {
                context_id,
                response,
            })
        }
    );
    hostcall!(
        "proxy_get_status",
        |c, ret_code: i32, ret_ptr: i32, ret_len: i32| {
            guard(c, "proxy_get_status")?;
            let (code, msg) = c.data().last_status.clone();
            write_u32(c, ret_code, code)?;
            copy_out(c, &msg, ret_ptr, ret_len)
        }
    );

    // ---- callouts ---------------------------------------------------------------------
    hostcall!(
        "proxy_http_call",
        |c,
         up_ptr: i32,
         up_len: i32,
         h_ptr: i32,
         h_len: i32,
         b_ptr: i32,
         b_len: i32,
         t_ptr: i32,
         t_len: i32,
         timeout_ms: i32,
         ret_token: i32| {
            let call = "proxy_http_call";
            guard(c, call)?;
            let cluster = read_string(c, up_ptr, up_len, MAX_PAIRS_BYTES)?;
            let headers = read_map(c, call, MapRole::RequestHeaders, h_ptr, h_len)?;
            let body = read_bytes(c, b_ptr, b_len, MAX_GUEST_BUFFER_BYTES)?;
            let trailers = read_map(c, call, MapRole::Trailers, t_ptr, t_len)?;
            for required in [":method", ":path", ":authority"] {
                if headers.get(required).is_none() {
                    c.data().emit_log(
                        LogLevel::Warn,
                        format!(
                            "proxy_http_call to {cluster:?} refused: the headers lack {required}"
                        ),
                    );
                    return bad();
                }
            }
            if !c.data().embedder.has_cluster(&cluster) {
                c.data().emit_log(
                    LogLevel::Warn,
                    format!("proxy_http_call refused: no cluster named {cluster:?}"),
                );
                return bad();
            }
            let (token, root, origin) = new_callout(c.data_mut(), call)?;
            c.data_mut().effects.push(Effect::HttpCall(HttpCallout {
                token,
                root_context_id: root,
                origin_context_id: origin,
                cluster,
                headers,
                body,
                trailers,
                timeout: timeout(timeout_ms),
            }));
            write_u32(c, ret_token, token)?;
            Ok(())
        }
    );
    hostcall!(
        "proxy_grpc_call",
        |c,
         up_ptr: i32,
         up_len: i32,
         s_ptr: i32,
         s_len: i32,
         m_ptr: i32,
         m_len: i32,
         md_ptr: i32,
         md_len: i32,
         msg_ptr: i32,
         msg_len: i32,
         timeout_ms: i32,
         ret_token: i32| {
            guard(c, "proxy_grpc_call")?;
            let mut call = read_grpc(
                c,
                [up_ptr, up_len, s_ptr, s_len, m_ptr, m_len, md_ptr, md_len],
            )?;
            call.message = Some(read_bytes(c, msg_ptr, msg_len, MAX_GUEST_BUFFER_BYTES)?);
            call.timeout = timeout(timeout_ms);
            let token = call.token;
            c.data_mut().effects.push(Effect::GrpcCall(call));
            write_u32(c, ret_token, token)?;
            Ok(())
        }
    );
    hostcall!(
        "proxy_grpc_stream",
        |c,
         up_ptr: i32,
         up_len: i32,
         s_ptr: i32,
         s_len: i32,
         m_ptr: i32,
         m_len: i32,
         md_ptr: i32,
         md_len: i32,
         ret_token: i32| {
            guard(c, "proxy_grpc_stream")?;
            let call = read_grpc(
                c,
                [up_ptr, up_len, s_ptr, s_len, m_ptr, m_len, md_ptr, md_len],
            )?;
            let token = call.token;
            c.data_mut().effects.push(Effect::GrpcStreamOpen(call));
            write_u32(c, ret_token, token)?;
            Ok(())
        }
    );
    hostcall!(
        "proxy_grpc_send",
        |c, token: i32, ptr: i32, len: i32, end: i32| {
            guard(c, "proxy_grpc_send")?;
            let token = token as u32;
            let message = read_bytes(c, ptr, len, MAX_GUEST_BUFFER_BYTES)?;
            match c.data().callouts.get(&token) {
                None => Err(Status::NotFound.into()),
                Some(p) if !p.grpc => bad(),
                Some(_) => {
                    c.data_mut().effects.push(Effect::GrpcSend {
                        token,
                        message,
                        end_stream: end != 0,
                    });
                    Ok(())
                }
            }
        }
    );
    hostcall!("proxy_grpc_cancel", |c, token: i32| {
        guard(c, "proxy_grpc_cancel")?;
        let token = token as u32;
        let s = c.data_mut();
        s.callouts.remove(&token).ok_or(Status::NotFound)?;
        s.effects.push(Effect::GrpcCancel { token });
        Ok(())
    });
    hostcall!("proxy_grpc_close", |c, token: i32| {
        guard(c, "proxy_grpc_close")?;
        let token = token as u32;
        let s = c.data_mut();
        if !s.callouts.contains_key(&token) {
            return Err(Status::NotFound.into());
        }
        s.effects.push(Effect::GrpcClose { token });
        Ok(())
    });

    // ---- properties -------------------------------------------------------------------
    hostcall!(
        "proxy_get_property",
        |c, ptr: i32, len: i32, ret_ptr: i32, ret_len: i32| {
            guard(c, "proxy_get_property")?;
            let path = pairs::property_path(&read_bytes(c, ptr, len, MAX_PAIRS_BYTES)?);
            let found = {
                let s = c.data();
                let root = s.active_root();
                let (name, root_id) = root
                    .map(|r| (r.plugin.name.as_str(), r.plugin.root_id.as_str()))
                    .unwrap_or((s.label.as_str(), ""));
                let stream = s.active_stream().map(|st| st.exchange.lock());
                let scope = PropertyScope {
                    plugin_name: name,
                    plugin_root_id: root_id,
                    plugin_vm_id: &s.vm_id,
                    stream: stream.as_ref().map(|ex| {
                        (
                            &ex.info,
                            &ex.request_headers,
                            &ex.response_headers,
                            &ex.response_trailers,
                        )
                    }),
                    filter_state: stream.as_ref().map(|ex| &ex.filter_state),
                };
                properties::lookup(&scope, &path)
            };
            match found {
                Lookup::Found(bytes) => copy_out(c, &bytes, ret_ptr, ret_len),
                Lookup::NotFound => Err(Status::NotFound.into()),
            }
        }
    );
    hostcall!(
        "proxy_set_property",
        |c, ptr: i32, len: i32, vptr: i32, vlen: i32| {
            guard(c, "proxy_set_property")?;
            let path = pairs::property_path(&read_bytes(c, ptr, len, MAX_PAIRS_BYTES)?);
            let value = read_bytes(c, vptr, vlen, MAX_GUEST_BUFFER_BYTES)?;
            if path.is_empty() {
                return bad();
            }
            // Properties live on the stream; a root context has none to set (the Rust SDK
            // accepts only OK, so the write is dropped with a warning instead of refused).
            match c.data().active_stream() {
                Some(stream) => {
                    stream
                        .exchange
                        .lock()
                        .filter_state
                        .insert(path.join("\0"), value);
                }
                None => c.data().emit_log(
                    LogLevel::Warn,
                    format!(
                        "proxy_set_property({}) outside a stream has no effect",
                        path.join(".")
                    ),
                ),
            }
            Ok(())
        }
    );

    // ---- shared data and queues -------------------------------------------------------
    hostcall!(
        "proxy_get_shared_data",
        |c, kptr: i32, klen: i32, ret_ptr: i32, ret_len: i32, ret_cas: i32| {
            guard(c, "proxy_get_shared_data")?;
            let key = read_string(c, kptr, klen, MAX_PAIRS_BYTES)?;
            let (value, cas) = {
                let s = c.data();
                s.shared.get(&s.vm_id, &key).ok_or(Status::NotFound)?
            };
            write_u32(c, ret_cas, cas)?;
            copy_out(c, &value, ret_ptr, ret_len)
        }
    );
    hostcall!(
        "proxy_set_shared_data",
        |c, kptr: i32, klen: i32, vptr: i32, vlen: i32, cas: i32| {
            guard(c, "proxy_set_shared_data")?;
            let key = read_string(c, kptr, klen, MAX_PAIRS_BYTES)?;
            let value = read_bytes(c, vptr, vlen, MAX_GUEST_BUFFER_BYTES)?;
            let s = c.data();
            // Over a quota, CAS_MISMATCH: the only refusal the SDKs accept from this call.
            match s.shared.set(
                &s.vm_id,
                &key,
                value,
                cas as u32,
                s.quotas.shared_data_bytes,
            ) {
                Ok(_) => Ok(()),
                Err(SetError::CasMismatch) => Err(Status::CasMismatch.into()),
                Err(SetError::TooManyKeys) => {
                    s.emit_log(
                        LogLevel::Error,
                        format!("shared data is full; {key:?} not stored"),
                    );
                    Err(Status::CasMismatch.into())
                }
                Err(SetError::TooManyBytes(after, _)) => {
                    s.refuse(
                        Limit::SharedDataBytes,
                        format!(
                            "proxy_set_shared_data({key:?}) refused with CAS_MISMATCH: vm_id {:?}'s data would hold {after} bytes",
                            s.vm_id
                        ),
                    );
                    Err(Status::CasMismatch.into())
                }
            }
        }
    );
    hostcall!(
        "proxy_register_shared_queue",
        |c, nptr: i32, nlen: i32, ret_id: i32| {
            guard(c, "proxy_register_shared_queue")?;
            let name = read_string(c, nptr, nlen, crate::limits::MAX_QUEUE_NAME_BYTES)?;
            let id = {
                let s = c.data();
                let root = s
                    .active_context()
                    .and_then(|ctx| s.root_of(ctx))
                    .ok_or(Status::BadArgument)?;
                let embedder = s.embedder.clone();
                let owner = QueueOwner {
                    vm_instance: s.instance_id,
                    root_context_id: root,
                    notify: std::sync::Arc::new(move |ready| embedder.queue_ready(ready)),
                };
                // The SDKs accept only OK here; past the queue count the call traps the
                // guest's SDK, as any refusal would.
                match s.shared.register_queue(&s.vm_id, &name, owner) {
                    Some(id) => id,
                    None => {
                        s.emit_log(
                            LogLevel::Error,
                            format!(
                                "proxy_register_shared_queue({name:?}) refused with BAD_ARGUMENT: vm_id {:?} has {} queues already",
                                s.vm_id,
                                crate::limits::MAX_QUEUES_PER_VM_ID
                            ),
                        );
                        return bad();
                    }
                }
            };
            write_u32(c, ret_id, id)?;
            Ok(())
        }
    );
    hostcall!(
        "proxy_resolve_shared_queue",
        |c, vptr: i32, vlen: i32, nptr: i32, nlen: i32, ret_id: i32| {
            guard(c, "proxy_resolve_shared_queue")?;
            let vm_id = read_string(c, vptr, vlen, MAX_PAIRS_BYTES)?;
            let name = read_string(c, nptr, nlen, MAX_PAIRS_BYTES)?;
            let id = {
                let s = c.data();
                let vm_id = if vm_id.is_empty() {
                    s.vm_id.as_str()
                } else {
                    vm_id.as_str()
                };
                s.shared
                    .resolve_queue(vm_id, &name)
                    .ok_or(Status::NotFound)?
            };
            write_u32(c, ret_id, id)?;
            Ok(())
        }
    );
    hostcall!(
        "proxy_enqueue_shared_queue",
        |c, id: i32, vptr: i32, vlen: i32| {
            let call = "proxy_enqueue_shared_queue";
            guard(c, call)?;
            let len = check_range(c, vptr, vlen)?;
            let (max_items, max_bytes) = (c.data().quotas.queue_items, c.data().quotas.queue_bytes);
            if len > max_bytes {
                c.data().refuse(
                    Limit::QueueBytes,
                    format!("{call} refused with BAD_ARGUMENT: a {len}-byte item is larger than the whole queue may hold"),
                );
                return bad();
            }
            let value = read_bytes(c, vptr, vlen, MAX_GUEST_BUFFER_BYTES)?;
            // A full queue drops its oldest items: the SDKs accept only OK or NOT_FOUND here.
            let done = c
                .data()
                .shared
                .enqueue(id as u32, value, max_items, max_bytes)
                .ok_or(Status::NotFound)?;
            let s = c.data_mut();
            for (limit, n) in [
                (Limit::QueueItems, done.dropped_for_items),
                (Limit::QueueBytes, done.dropped_for_bytes),
            ] {
                if n > 0 {
                    s.queue_overflows += n as u64;
                    s.refuse(
                        limit,
                        format!("shared queue {id} is full; dropped its {n} oldest items"),
                    );
                }
            }
            Ok(())
        }
    );
    hostcall!(
        "proxy_dequeue_shared_queue",
        |c, id: i32, ret_ptr: i32, ret_len: i32| {
            guard(c, "proxy_dequeue_shared_queue")?;
            let item = c
                .data()
                .shared
                .dequeue(id as u32)
                .ok_or(Status::NotFound)?
                .ok_or(Status::Empty)?;
            copy_out(c, &item, ret_ptr, ret_len)
        }
    );

    // ---- metrics ----------------------------------------------------------------------
    hostcall!(
        "proxy_define_metric",
        |c, kind: i32, nptr: i32, nlen: i32, ret_id: i32| {
            let call = "proxy_define_metric";
            guard(c, call)?;
            let kind = MetricType::from_i32(kind).ok_or(Status::BadArgument)?;
            let len = check_range(c, nptr, nlen)?;
            let s = c.data();
            if len > s.quotas.metric_name_bytes {
                s.refuse(
                    Limit::MetricNameBytes,
                    format!("{call} refused with BAD_ARGUMENT: a {len}-byte name"),
                );
                return bad();
            }
            let name = read_string(c, nptr, nlen, MAX_PAIRS_BYTES)?;
            let id = {
                let s = c.data();
                let root = s.active_root().ok_or(Status::BadArgument)?;
                match root.plugin.metrics.define(kind, &name, s.quotas.metrics) {
                    Ok(id) => id,
                    Err(MetricError::TooMany) => {
                        s.refuse(
                            Limit::Metrics,
                            format!("{call}({name:?}) refused with BAD_ARGUMENT"),
                        );
                        return bad();
                    }
                    Err(e) => return Err(metric_status(e).into()),
                }
            };
            write_u32(c, ret_id, id)?;
            Ok(())
        }
    );
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: C<'_>, id: i32, delta: i64| {
            finish((|| {
                guard(&c, "proxy_increment_metric")?;
                let root = c.data().active_root().ok_or(Status::NotFound)?;
                root.plugin
                    .metrics
                    .increment(id as u32, delta)
                    .map_err(metric_status)?;
                Ok(())
            })())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |c: C<'_>, id: i32, value: i64| {
            finish((|| {
                guard(&c, "proxy_record_metric")?;
                let root = c.data().active_root().ok_or(Status::NotFound)?;
                root.plugin
                    .metrics
                    .record(id as u32, value as u64)
                    .map_err(|_| Status::NotFound)?;
                Ok(())
            })())
        },
    )?;
    hostcall!("proxy_get_metric", |c, id: i32, ret: i32| {
        guard(c, "proxy_get_metric")?;
        let value = {
            let root = c.data().active_root().ok_or(Status::NotFound)?;
            root.plugin.metrics.get(id as u32).map_err(metric_status)?
        };
        write_u64(c, ret, value)?;
        Ok(())
    });

    // ---- foreign functions ------------------------------------------------------------
    hostcall!(
        "proxy_call_foreign_function",
        |c, nptr: i32, nlen: i32, aptr: i32, alen: i32, ret_ptr: i32, ret_len: i32| {
            guard(c, "proxy_call_foreign_function")?;
            let name = read_string(c, nptr, nlen, MAX_PAIRS_BYTES)?;
            let args = read_bytes(c, aptr, alen, MAX_GUEST_BUFFER_BYTES)?;
            let function = c
                .data()
                .foreign
                .get(&name)
                .cloned()
                .ok_or(Status::NotFound)?;
            let result = function(&args).map_err(HostError::Status)?;
            copy_out(c, &result, ret_ptr, ret_len)
        }
    );

    // ---- ABI 0.1.0 --------------------------------------------------------------------
    hostcall!(
        "proxy_get_configuration",
        |c, ret_ptr: i32, ret_len: i32| {
            guard(c, "proxy_get_configuration")?;
            let config = c
                .data()
                .active_root()
                .map(|r| r.plugin.configuration.clone())
                .unwrap_or_default();
            copy_out(c, &config, ret_ptr, ret_len)
        }
    );

    // ---- emscripten extras (registered unconditionally, as cpp-host does) --------------
    linker.func_wrap(
        "env",
        "emscripten_notify_memory_growth",
        |_: C<'_>, _: i32| {},
    )?;
    linker.func_wrap("env", "pthread_equal", |_: C<'_>, a: i32, b: i32| {
        i32::from(a == b)
    })?;
    Ok(())
}

fn metric_status(e: MetricError) -> Status {
    match e {
        MetricError::NotFound => Status::NotFound,
        MetricError::BadArgument | MetricError::TooMany => Status::BadArgument,
    }
}

fn timeout(ms: i32) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms as u64))
}

/// Reads a serialized map a guest hands over and checks it (see [`check_map`]).
fn read_map(c: &C<'_>, call: &str, role: MapRole, ptr: i32, len: i32) -> HostResult<Fields> {
    let bytes = read_bytes(c, ptr, len, MAX_PAIRS_BYTES)?;
    let fields = pairs::deserialize(&bytes).map_err(|e| {
        c.data().refuse(
            Limit::HeaderSyntax,
            format!("{call} refused with BAD_ARGUMENT: {e}"),
        );
        Status::BadArgument
    })?;
    check_map(c.data(), call, role, &fields)?;
    Ok(fields)
}

/// The rules a map written by a guest follows: the map's role decides its pseudo-headers.
fn role_of(kind: MapType) -> MapRole {
    match kind {
        MapType::HttpRequestHeaders => MapRole::RequestHeaders,
        MapType::HttpResponseHeaders => MapRole::ResponseHeaders,
        _ => MapRole::Trailers,
    }
}

/// Checks a whole map against the header rules ([`pairs::check_field`]) and the filter's
/// per-map quotas. A refusal is counted, logged (rate-limited) and answered BAD_ARGUMENT.
fn check_map(s: &VmState, call: &str, role: MapRole, fields: &Fields) -> HostResult {
    if let Err(e) = pairs::check_fields(role, fields) {
        s.refuse(
            Limit::HeaderSyntax,
            format!("{call} refused with BAD_ARGUMENT: {e}"),
        );
        return bad();
    }
    check_map_size(s, call, fields.len(), fields.byte_size())
}

/// Checks one field a guest writes (see [`check_map`]).
fn check_one(s: &VmState, call: &str, role: MapRole, name: &str, value: &[u8]) -> HostResult {
    if let Err(e) = pairs::check_field(role, name, value) {
        s.refuse(
            Limit::HeaderSyntax,
            format!("{call} refused with BAD_ARGUMENT: {e}"),
        );
        return bad();
    }
    Ok(())
}

/// Checks what a map would hold against `headerCount` and `headerBytes`.
fn check_map_size(s: &VmState, call: &str, count: usize, bytes: usize) -> HostResult {
    if count > s.quotas.header_count {
        s.refuse(
            Limit::HeaderCount,
            format!("{call} refused with BAD_ARGUMENT: the map would hold {count} fields"),
        );
        return bad();
    }
    if bytes > s.quotas.header_bytes {
        s.refuse(
            Limit::HeaderBytes,
            format!("{call} refused with BAD_ARGUMENT: the map would hold {bytes} bytes"),
        );
        return bad();
    }
    Ok(())
}

/// Registers a callout for the active context's root and returns (token, root, origin).
/// Past the filter's `pendingCallouts` the call answers INTERNAL_FAILURE (the status every
/// SDK accepts from a dispatch).
fn new_callout(s: &mut VmState, call: &str) -> HostResult<(u32, u32, u32)> {
    let grpc = call != "proxy_http_call";
    let origin = s.active_context().ok_or(Status::InternalFailure)?;
    let root = s.root_of(origin).ok_or(Status::InternalFailure)?;
    if s.callouts.len() >= s.quotas.pending_callouts {
        s.refuse(
            Limit::PendingCallouts,
            format!(
                "{call} refused with INTERNAL_FAILURE: {} callouts outstanding",
                s.callouts.len()
            ),
        );
        return Err(Status::InternalFailure.into());
    }
    let token = s.fresh_token();
    s.callouts.insert(
        token,
        PendingCallout {
            root_context_id: root,
            grpc,
        },
    );
    Ok((token, root, origin))
}

fn read_grpc(c: &mut C<'_>, a: [i32; 8]) -> HostResult<GrpcCallout> {
    let cluster = read_string(c, a[0], a[1], MAX_PAIRS_BYTES)?;
    let service = read_string(c, a[2], a[3], MAX_PAIRS_BYTES)?;
    let method = read_string(c, a[4], a[5], MAX_PAIRS_BYTES)?;
    let initial_metadata = read_map(c, "proxy_grpc_call", MapRole::Trailers, a[6], a[7])?;
    if !c.data().embedder.has_cluster(&cluster) {
        c.data().emit_log(
            LogLevel::Warn,
            format!("gRPC call refused: no cluster named {cluster:?}"),
        );
        return Err(Status::ParseFailure.into());
    }
    let (token, root, origin) = new_callout(c.data_mut(), "proxy_grpc_call")?;
    Ok(GrpcCallout {
        token,
        root_context_id: root,
        origin_context_id: origin,
        cluster,
        service,
        method,
        initial_metadata,
        message: None,
        timeout: None,
    })
}

/// Records an effect on the active stream. Outside a stream the SDKs still expect OK, so the
/// request is logged and dropped.
fn stream_effect(s: &mut VmState, make: impl FnOnce(u32) -> Effect) -> HostResult {
    match s.active_context() {
        Some(ctx) if s.streams.contains_key(&ctx) => {
            s.effects.push(make(ctx));
        }
        _ => s.emit_log(
            LogLevel::Warn,
            "a stream operation was called outside a stream context; ignored".into(),
        ),
    }
    Ok(())
}

/// Runs `f` on the buffer of `kind` visible in the current callback.
fn with_buffer<R>(s: &VmState, kind: BufferType, f: impl FnOnce(&[u8]) -> R) -> HostResult<R> {
    match kind {
        BufferType::HttpRequestBody | BufferType::HttpResponseBody => {
            let stream = s.active_stream().ok_or(Status::NotFound)?;
            let ex = stream.exchange.lock();
            Ok(f(if kind == BufferType::HttpRequestBody {
                &ex.request_body
            } else {
                &ex.response_body
            }))
        }
        BufferType::HttpCallResponseBody => match (&s.call_response, s.phase) {
            (Some(r), Phase::HttpCallResponse) => Ok(f(&r.body)),
            _ => Err(Status::NotFound.into()),
        },
        BufferType::GrpcReceiveBuffer => match (&s.grpc_message, s.phase) {
            (Some(m), Phase::GrpcCallback) => Ok(f(m)),
            _ => Err(Status::NotFound.into()),
        },
        BufferType::VmConfiguration | BufferType::PluginConfiguration => {
            let root = s.active_root().ok_or(Status::NotFound)?;
            match (kind, s.phase) {
                (BufferType::VmConfiguration, Phase::VmStart) => {
                    Ok(f(&root.plugin.vm_configuration))
                }
                (BufferType::PluginConfiguration, Phase::Configure) => {
                    Ok(f(&root.plugin.configuration))
                }
                _ => Err(Status::NotFound.into()),
            }
        }
        BufferType::ForeignFunctionArguments => match (&s.foreign_args, s.phase) {
            (Some(a), Phase::ForeignFunction) => Ok(f(a)),
            _ => Err(Status::NotFound.into()),
        },
        BufferType::DownstreamData | BufferType::UpstreamData => {
            let stream = s.active_stream().ok_or(Status::NotFound)?;
            let ex = stream.exchange.lock();
            Ok(f(if kind == BufferType::DownstreamData {
                &ex.downstream_data
            } else {
                &ex.upstream_data
            }))
        }
    }
}

/// Runs `f` on the map of `kind` visible in the current callback.
fn with_map<R>(s: &VmState, kind: MapType, f: impl FnOnce(&Fields) -> R) -> HostResult<R> {
    match kind {
        MapType::HttpCallResponseHeaders | MapType::HttpCallResponseTrailers => {
            match (&s.call_response, s.phase) {
                (Some(r), Phase::HttpCallResponse) => {
                    Ok(f(if kind == MapType::HttpCallResponseHeaders {
                        &r.headers
                    } else {
                        &r.trailers
                    }))
                }
                _ => Err(Status::NotFound.into()),
            }
        }
        MapType::GrpcReceiveInitialMetadata | MapType::GrpcReceiveTrailingMetadata => {
            match (&s.grpc_metadata, s.phase) {
                (Some(m), Phase::GrpcCallback) => Ok(f(m)),
                _ => Err(Status::NotFound.into()),
            }
        }
        _ => {
            let stream = s.active_stream().ok_or(Status::NotFound)?;
            let ex = stream.exchange.lock();
            Ok(f(match kind {
                MapType::HttpRequestHeaders => &ex.request_headers,
                MapType::HttpRequestTrailers => &ex.request_trailers,
                MapType::HttpResponseHeaders => &ex.response_headers,
                _ => &ex.response_trailers,
            }))
        }
    }
}

/// Runs `f` on a writable stream map. Callout and gRPC maps are read-only, and a stream map
/// outside a stream has nowhere to go: both are logged and otherwise ignored, because the
/// Rust SDK accepts only OK from the map setters.
fn with_map_mut(
    s: &VmState,
    kind: MapType,
    f: impl FnOnce(&mut Fields) -> HostResult,
) -> HostResult {
    let Some(stream) = s.active_stream() else {
        s.emit_log(
            LogLevel::Warn,
            format!("header map {kind:?} changed outside a stream context; ignored"),
        );
        return Ok(());
    };
    let mut ex = stream.exchange.lock();
    match kind {
        MapType::HttpRequestHeaders => f(&mut ex.request_headers),
        MapType::HttpRequestTrailers => f(&mut ex.request_trailers),
        MapType::HttpResponseHeaders => f(&mut ex.response_headers),
        MapType::HttpResponseTrailers => f(&mut ex.response_trailers),
        _ => {
            drop(ex);
            s.emit_log(
                LogLevel::Warn,
                format!("header map {kind:?} is read-only; change ignored"),
            );
            Ok(())
        }
    }
}
