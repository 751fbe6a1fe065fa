//! `floor_proxy`: the least a reverse proxy built on the gateway's own HTTP stack (tokio,
//! hyper's HTTP/1.1 server, hyper-util's pooled client, mimalloc) does per request, so that
//! `bench/proxy.sh` can split the gateway's cost into "the stack" (this) and "the gateway's own
//! work" (the rest). It is a benchmark floor, not a product: it owns nothing but that.
//!
//! Per request it does what any HTTP/1.1 proxy must: read the head, read the body whole, send
//! `POST` with that body and `content-type` to the same path on the upstream over a pooled
//! keep-alive connection, and relay the reply's status, `content-type` and body (streamed, as
//! it arrives). It does not parse JSON, authenticate, admit, route, log, or count anything.
//!
//! It serves on `--lanes` threads, each a one-thread runtime with its own upstream pool, as the
//! gateway's lanes are. Unlike the gateway (one acceptor that hands each connection to the lane
//! with the fewest), each lane here accepts on its own listener on the same port
//! (`SO_REUSEPORT`): the kernel spreads connections, and no hand-over is paid, so the floor
//! stays the least a proxy on this stack can cost.
//!
//! ```text
//! floor_proxy --listen 127.0.0.1:9000 --upstream http://127.0.0.1:9001 [--lanes N]
//! ```
//! Traffic goes only to `--upstream`, which must be a loopback `http://` address.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Upstream = Client<HttpConnector, Full<Bytes>>;
type Reply = Response<http_body_util::Either<Incoming, Full<Bytes>>>;

struct Args {
    listen: SocketAddr,
    upstream: Uri,
    lanes: usize,
}

fn args() -> Result<Args, String> {
    let mut listen = None;
    let mut upstream = None;
    let mut lanes = 1usize;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => listen = Some(value()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--upstream" => {
                let u: Uri = value()?.parse().map_err(|e| format!("--upstream: {e}"))?;
                let loopback = matches!(u.host(), Some("127.0.0.1" | "localhost" | "[::1]"));
                if u.scheme_str() != Some("http") || !loopback {
                    return Err("--upstream must be http:// on a loopback address".into());
                }
                upstream = Some(u);
            }
            "--lanes" => {
                lanes = value()?
                    .parse::<usize>()
                    .map_err(|e| format!("--lanes: {e}"))?
                    .clamp(1, 64)
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        upstream: upstream.ok_or("--upstream is required")?,
        lanes,
    })
}

fn main() {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("floor_proxy: {e}");
            std::process::exit(2);
        }
    };
    let threads: Vec<_> = (0..args.lanes)
        .map(|lane| {
            let (listen, upstream) = (args.listen, args.upstream.clone());
            std::thread::Builder::new()
                .name(format!("floor-lane-{lane}"))
                .spawn(move || lane_main(listen, upstream))
                .expect("spawn a lane")
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

fn lane_main(listen: SocketAddr, upstream: Uri) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.set_reuseport(true).expect("SO_REUSEPORT");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        if let Err(e) = socket.bind(listen) {
            eprintln!("floor_proxy: cannot bind {listen}: {e} (address in use?)");
            std::process::exit(1);
        }
        let listener = socket.listen(1024).expect("listen");
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let client: Upstream = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build(http);
        let base = upstream.to_string();
        let base: std::sync::Arc<str> = base.trim_end_matches('/').into();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let (client, base) = (client.clone(), base.clone());
                    async move { Ok::<_, Infallible>(forward(&client, &base, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
}

async fn forward(client: &Upstream, base: &str, req: Request<Incoming>) -> Reply {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return plain(StatusCode::BAD_REQUEST);
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("{base}{path}").parse::<Uri>() else {
        return plain(StatusCode::BAD_REQUEST);
    };
    let mut up = Request::new(Full::new(body));
    *up.method_mut() = parts.method;
    *up.uri_mut() = uri;
    if let Some(ct) = parts.headers.get(CONTENT_TYPE) {
        up.headers_mut().insert(CONTENT_TYPE, ct.clone());
    }
    if let Some(host) = parts.headers.get(HOST) {
        up.headers_mut().insert(HOST, host.clone());
    }
    match client.request(up).await {
        Ok(resp) => {
            let (p, body) = resp.into_parts();
            let mut out = Response::new(http_body_util::Either::Left(body));
            *out.status_mut() = p.status;
            if let Some(ct) = p.headers.get(CONTENT_TYPE) {
                out.headers_mut().insert(CONTENT_TYPE, ct.clone());
            }
            out
        }
        Err(_) => plain(StatusCode::BAD_GATEWAY),
    }
}

fn plain(status: StatusCode) -> Reply {
    let mut r = Response::new(http_body_util::Either::Right(Full::new(Bytes::new())));
    *r.status_mut() = status;
    r
}
