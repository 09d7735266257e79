use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const P: &str = "/v1/secrets/";

#[test]
fn a_plain_get_is_parsed_where_it_lies() {
    let buf = b"GET /v1/secrets/db?vault=v HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\nAccept: */*\r\nConnection: Keep-Alive\r\n\r\nGET /v1/";
    assert!(parse(b"GET /v1/secrets/db?waiting=1 HTTP/1.1\r\n\r\n", P).is_ok(), "only the key `wait`");
    let p = parse(buf, P).unwrap();
    assert_eq!(p.target, "/v1/secrets/db?vault=v");
    assert!(!p.raw);
    assert_eq!(&buf[p.len..], b"GET /v1/", "the next request's first bytes stay");
    let req = p.request().unwrap();
    assert_eq!(req.uri().path(), "/v1/secrets/db");
    assert_eq!(req.uri().query(), Some("vault=v"));
    assert!(req.headers().is_empty(), "no header the route would read");
}

/// The raw answer is chosen as `Head::wants_raw` chooses it from hyper's request.
#[test]
fn accept_for_the_raw_value_is_read_as_the_route_reads_it() {
    let head = |accept: &[u8]| {
        let mut h = b"GET /v1/secrets/db HTTP/1.1\r\nAccept: ".to_vec();
        h.extend_from_slice(accept);
        h.extend_from_slice(b"\r\n\r\n");
        h
    };
    for (accept, raw) in [
        (&b"application/octet-stream"[..], true),
        (b"text/plain, application/octet-stream;q=0.9", true),
        (b"application/json", false),
        (b"*/*", false),
        (b"\xc3\xa9, application/octet-stream", false),
    ] {
        let h = head(accept);
        let p = parse(&h, P).unwrap();
        assert_eq!(p.raw, raw, "{:?}", String::from_utf8_lossy(accept));
        let req = p.request().unwrap();
        let via_map = Request::builder()
            .uri("/v1/secrets/db")
            .header(header::ACCEPT, http::HeaderValue::from_bytes(accept).unwrap())
            .body(())
            .unwrap();
        use super::super::Head;
        assert_eq!(req.wants_raw(), via_map.wants_raw());
        assert_eq!(p.wants_raw(), via_map.wants_raw(), "read in place as from the header map");
    }
}

/// A target read in place gives the routes what its `Uri` gives them — path, query, method,
/// no body — for every visible ASCII character the in-place reading accepts, in the path and
/// in the query; a target with `#`, or with a character a `Uri` refuses, goes through a `Uri`.
#[test]
fn a_target_read_in_place_reads_as_its_uri() {
    use super::super::Head;
    let fixed = ["/v1/secrets/db", "/v1/secrets/db?", "/v1/secrets/db?vault=v&version=x?y", "/v1/secrets/?"];
    let mut targets: Vec<String> = fixed.iter().map(|t| (*t).to_owned()).collect();
    targets.extend((0x21u8..=0x7e).map(|b| format!("/v1/secrets/a{c}b?q{c}r", c = char::from(b))));
    let mut in_place = 0;
    for target in &targets {
        let head = format!("GET {target} HTTP/1.1\r\n\r\n");
        let p = parse(head.as_bytes(), P).unwrap_or_else(|e| panic!("{target}: {e:?}"));
        if !p.in_place() {
            continue;
        }
        in_place += 1;
        let req = p.request().unwrap_or_else(|| panic!("{target}: read in place, but a Uri refuses it"));
        assert_eq!(p.path(), req.uri().path(), "{target}");
        assert_eq!(Head::query(&p), req.uri().query(), "{target}");
        assert_eq!(Head::method(&p), req.method());
        assert!(!p.has_body());
    }
    assert!(in_place >= fixed.len() + 60, "most targets are read in place: {in_place}");
    for target in
        ["/v1/secrets/db#frag", "/v1/secrets/d\"b", "/v1/secrets/d{b}", "/v1/secrets/d|b", "/v1/secrets/d\\b"]
    {
        let head = format!("GET {target} HTTP/1.1\r\n\r\n");
        let p = parse(head.as_bytes(), P).unwrap_or_else(|e| panic!("{target}: {e:?}"));
        assert!(!p.in_place(), "{target}: read as its Uri reads it instead");
    }
}

/// Everything but a whole plain GET under the prefix goes to hyper, which answers it as
/// before (a 400, a 405, a body refused, a close honoured).
#[test]
fn anything_else_is_hyper_s() {
    let cases: &[(&[u8], NotPlain)] = &[
        (b"GET /v1/secrets/db HTTP/1.1\r\nHost: x\r\n", NotPlain::Partial),
        (b"GET /v1/secr", NotPlain::Partial),
        (
            b"GET /v1/secrets/db HTTP/1.1\r\nHo st: x\r\n\r\n",
            NotPlain::Malformed(httparse::Error::HeaderName),
        ),
        (b"G\x00T / HTTP/1.1\r\n\r\n", NotPlain::Malformed(httparse::Error::Token)),
        (b"POST /v1/secrets/db HTTP/1.1\r\n\r\n", NotPlain::Other),
        (b"HEAD /v1/secrets/db HTTP/1.1\r\n\r\n", NotPlain::Other),
        (b"GET /v1/secrets/db HTTP/1.0\r\n\r\n", NotPlain::Other),
        (b"GET /v1/health HTTP/1.1\r\n\r\n", NotPlain::Other),
        (b"GET /v1/secrets/db HTTP/1.1\r\nContent-Length: 0\r\n\r\n", NotPlain::Other),
        (b"GET /v1/secrets/db HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", NotPlain::Other),
        (b"GET /v1/secrets/db HTTP/1.1\r\nExpect: 100-continue\r\n\r\n", NotPlain::Other),
        (b"GET /v1/secrets/db HTTP/1.1\r\nConnection: close\r\n\r\n", NotPlain::Other),
        (b"GET /v1/secrets/db HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n", NotPlain::Other),
        (b"GET /v1/secrets/db?changed_from=ab&wait=30 HTTP/1.1\r\n\r\n", NotPlain::Other),
        (b"GET /v1/secrets/db?wait HTTP/1.1\r\n\r\n", NotPlain::Other),
    ];
    for (head, why) in cases {
        assert_eq!(parse(head, P).map(|p| p.len), Err(*why), "{:?}", String::from_utf8_lossy(head));
    }
    let many: String = (0..MAX_HEADERS + 1).map(|i| format!("X-{i}: y\r\n")).collect();
    let head = format!("GET /v1/secrets/db HTTP/1.1\r\n{many}\r\n");
    assert_eq!(
        parse(head.as_bytes(), P).map(|p| p.len),
        Err(NotPlain::Other),
        "more headers than counted: hyper's"
    );
}

/// The answer's bytes: hyper's status line, the response's headers, a length and a date,
/// then the body, in one write.
#[tokio::test]
async fn an_answer_is_written_as_hyper_writes_it() {
    let (mut a, mut b) = tokio::io::duplex(4096);
    let mut r = Response::new(http_body_util::Full::new(Bytes::from_static(b"{\"v\":1}")));
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r.headers_mut().insert("x-request-id", http::HeaderValue::from_static("abc"));
    write_response(&mut a, &mut Vec::new(), r).await.unwrap();
    let mut n = Response::new(http_body_util::Full::new(Bytes::new()));
    *n.status_mut() = StatusCode::NOT_MODIFIED;
    write_response(&mut a, &mut Vec::new(), n).await.unwrap();
    drop(a);
    let mut got = String::new();
    b.read_to_string(&mut got).await.unwrap();
    let (first, second) = got.split_once("\r\n\r\n{\"v\":1}").unwrap();
    let lines: Vec<&str> = first.split("\r\n").collect();
    assert_eq!(
        lines[..4],
        ["HTTP/1.1 200 OK", "content-type: application/json", "x-request-id: abc", "content-length: 7"]
    );
    assert!(lines[4].starts_with("date: ") && lines[4].ends_with(" GMT"), "{first}");
    assert!(second.starts_with("HTTP/1.1 304 Not Modified\r\ndate: "), "{second}");
    assert!(second.ends_with("\r\n\r\n"), "no length and no body for a 304: {second:?}");
}

#[tokio::test]
async fn hyper_reads_what_the_plain_path_read_first() {
    let (a, mut b) = tokio::io::duplex(64);
    let mut rw = Rewind::new(b"HEAD ".to_vec(), a);
    b.write_all(b"/x").await.unwrap();
    let mut got = [0u8; 3];
    rw.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"HEA");
    let mut rest = [0u8; 4];
    rw.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"D /x", "then the stream itself");
}
