//! `carpulse connect` on a headless server: `--paste` takes the address the browser ended on
//! from stdin and listens on nothing; a redirect port that is taken is an error naming the
//! address at once, never a wait on another address.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::common::{start_simulator, write_config, BIN};

#[tokio::test]
async fn connect_paste_takes_the_address_from_stdin_and_serves_nothing() {
    let (_sim, base) = start_simulator(&[]).await;
    let setup = write_config(&base, "v3", "");
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "--config",
            &setup.config.display().to_string(),
            "connect",
            "--paste",
            "--wait",
            "60s",
        ])
        .env_remove("CARPULSE_CONFIG")
        .env("RUST_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .expect("the Connect URL in time")
        .unwrap()
        .expect("the Connect URL");
    assert!(url.contains("response_type=code"), "{url}");
    let hint = stderr.next_line().await.unwrap().unwrap_or_default();
    assert!(hint.contains("paste it here"), "{hint}");
    // Nothing listens on the redirect URI.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", setup.redirect_port)).is_err(),
        "--paste must not serve the redirect URI"
    );
    // The browser: the simulator approves and redirects to the (unreachable) redirect URI.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = browser.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 302);
    let landed = resp.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        landed.contains("code=") && landed.contains("state="),
        "{landed}"
    );

    // Not an address, then another flow's address: said, and waited on.
    stdin.write_all(b"hello\n").await.unwrap();
    let said = stderr.next_line().await.unwrap().unwrap_or_default();
    assert!(
        said.contains("not the address the browser ended on"),
        "{said}"
    );
    let other = format!(
        "http://127.0.0.1:{}/exchange?code=x&state=not-this-one",
        setup.redirect_port
    );
    stdin
        .write_all(format!("{other}\n").as_bytes())
        .await
        .unwrap();
    let said = stderr.next_line().await.unwrap().unwrap_or_default();
    assert!(said.contains("belongs to another Connect"), "{said}");
    // The real one, as pasted from the address bar.
    stdin
        .write_all(format!("  {landed}  \n").as_bytes())
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("connect ends")
        .unwrap();
    let mut rest = Vec::new();
    while let Ok(Some(l)) = stdout.next_line().await {
        rest.push(l);
    }
    let mut err = Vec::new();
    while let Ok(Some(l)) = stderr.next_line().await {
        err.push(l);
    }
    assert_eq!(status.code(), Some(0), "{err:?}");
    assert!(rest[0].starts_with("stored connection 1 "), "{rest:?}");
    assert_eq!(
        rest.iter().filter(|l| l.starts_with("  ")).count(),
        2,
        "{rest:?}"
    );
}

#[tokio::test]
async fn a_taken_redirect_port_is_an_error_that_names_the_address() {
    let (_sim, base) = start_simulator(&[]).await;
    let setup = write_config(&base, "v3", "");
    // Another program holds the redirect URI's port on 127.0.0.1.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = std::fs::read_to_string(&setup.config).unwrap().replace(
        &format!("http://127.0.0.1:{}/exchange", setup.redirect_port),
        &format!("http://localhost:{port}/exchange"),
    );
    std::fs::write(&setup.config, text).unwrap();
    let cfg = setup.config.display().to_string();
    let started = std::time::Instant::now();
    let (code, out, err) = crate::carpulse(&["--config", &cfg, "connect", "--wait", "10m"], &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(started.elapsed() < Duration::from_secs(10), "no waiting");
    assert!(
        err.contains(&format!("127.0.0.1:{port} is in use")) && err.contains("--paste"),
        "{err}"
    );
    assert!(
        out.is_empty(),
        "no Connect URL for a flow that cannot finish: {out}"
    );
    assert!(!setup.db.exists(), "no store created");
    drop(taken);

    // The same on [::1] when the machine has IPv6: a browser resolving localhost there would
    // reach the other program.
    let Ok(taken6) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here; the [::1] case is not checked");
        return;
    };
    let port6 = taken6.local_addr().unwrap().port();
    let text = std::fs::read_to_string(&setup.config).unwrap().replace(
        &format!("localhost:{port}/"),
        &format!("localhost:{port6}/"),
    );
    std::fs::write(&setup.config, text).unwrap();
    let (code, _, err) = crate::carpulse(&["--config", &cfg, "connect", "--wait", "10m"], &[]);
    if std::net::TcpListener::bind(("127.0.0.1", port6)).is_err() {
        return; // the port is taken on IPv4 too (dual stack); covered above
    }
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("[::1]:{port6} is in use")), "{err}");
}
