//! `carpulse_reading_age_seconds` through the real binary against the simulator: the ages are
//! written at each scrape from the reading times (issue 8), so between two scrapes without a
//! poll they grow by exactly the time between the scrapes, and a scrape can ask for one
//! family (`?name[]=`) without the daemon writing the others.

use std::time::{Duration, Instant};

use super::common::{connect, metric, spawn, start_simulator, wait_for, write_config};

/// A schedule that never runs while a test does (03:00 and 04:00 UTC on 1 January): the only
/// polls are the start's catch-up of vehicles never polled.
const NEVER: &str = "battery = \"0 0 3 1 1 *\"\ninfo = \"0 0 4 1 1 *\"";

/// One scrape of `path` and the instants just before it was sent and just after its body
/// came: the daemon's clock read for it lies in between.
async fn scrape(http: &reqwest::Client, port: u16, path: &str) -> (Instant, String, Instant) {
    let sent = Instant::now();
    let text = try_scrape(http, port, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    (sent, text, Instant::now())
}

async fn try_scrape(http: &reqwest::Client, port: u16, path: &str) -> reqwest::Result<String> {
    http.get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await?
        .text()
        .await
}

/// Every request to Smartcar's Vehicle API the daemon counted, whatever its outcome.
fn requests(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("carpulse_smartcar_requests_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_ages_grow_with_the_clock_between_scrapes_without_a_poll() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&[]).await;
    let setup = write_config(&base, "v2", NEVER);
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    let port = setup.metrics_port;

    // The start's catch-up polls both jobs of both vehicles; then nothing is due.
    let ages_of = |text: &str| -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| l.starts_with("carpulse_reading_age_seconds{"))
            .filter_map(|l| {
                let (series, v) = l.rsplit_once(' ')?;
                Some((series.to_owned(), v.parse().ok()?))
            })
            .collect()
    };
    wait_for(
        "the battery and odometer ages of both vehicles",
        Duration::from_secs(60),
        || {
            let http = http.clone();
            async move {
                // Nothing answers until the daemon listens.
                let text = try_scrape(&http, port, "/metrics")
                    .await
                    .unwrap_or_default();
                let ages = ages_of(&text);
                let of = |signal: &str| {
                    let label = format!("signal=\"{signal}\"");
                    ages.iter().filter(|(s, _)| s.contains(&label)).count()
                };
                of("battery") == 2 && of("odometer") == 2
            }
        },
    )
    .await;

    let (sent1, first, got1) = scrape(&http, port, "/metrics").await;
    let ages1 = ages_of(&first);
    // Until the daemon's clock has moved a second past the first scrape, with no poll.
    let mut second = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while second.is_none() {
        assert!(Instant::now() < deadline, "ages did not grow within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (sent2, text, got2) = scrape(&http, port, "/metrics").await;
        let grown = ages_of(&text)
            .first()
            .zip(ages1.first())
            .is_some_and(|((_, a2), (_, a1))| a2 - a1 >= 1.0);
        if grown {
            second = Some((sent2, text, got2));
        }
    }
    let Some((sent2, second, got2)) = second else {
        unreachable!()
    };
    assert_eq!(
        requests(&first),
        requests(&second),
        "no request to Smartcar between the scrapes"
    );
    let ages2 = ages_of(&second);
    assert_eq!(
        ages1.iter().map(|(s, _)| s).collect::<Vec<_>>(),
        ages2.iter().map(|(s, _)| s).collect::<Vec<_>>(),
        "the same series, in the same order"
    );
    // The daemon read its clock for each scrape between sending it and its body's end: every
    // age grew by the same step, within those bounds (1 ms of rounding, 50 ms for the
    // difference between the wall clock and the monotonic one).
    let (low, high) = (
        sent2.saturating_duration_since(got1).as_secs_f64() - 0.051,
        got2.duration_since(sent1).as_secs_f64() + 0.051,
    );
    let step = ages2[0].1 - ages1[0].1;
    for ((series, a1), (_, a2)) in ages1.iter().zip(&ages2) {
        let grew = a2 - a1;
        assert!((grew - step).abs() < 1e-6, "{series}: {a1} -> {a2}");
        assert!(
            (low..=high).contains(&grew),
            "{series}: {a1} -> {a2}, scrapes {low:.3}..{high:.3} s apart"
        );
        // Its reading time stood still: the age is now minus it.
        let labels: Vec<(&str, &str)> = ["vehicle_id", "signal"]
            .iter()
            .map(|k| {
                let v = series
                    .split(&format!("{k}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or_default();
                (*k, v)
            })
            .collect();
        let at1 = metric(&first, "carpulse_reading_timestamp_seconds", &labels);
        let at2 = metric(&second, "carpulse_reading_timestamp_seconds", &labels);
        assert!(at1.is_some() && at1 == at2, "{series}: {at1:?} {at2:?}");
    }

    // One family asked for: only its text, the same series.
    let (_, only, _) = scrape(&http, port, "/metrics?name[]=carpulse_reading_age_seconds").await;
    let families: Vec<&str> = only
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    assert!(
        !families.is_empty()
            && families
                .iter()
                .all(|f| *f == "carpulse_reading_age_seconds"),
        "{only}"
    );
    assert_eq!(
        ages_of(&only)
            .into_iter()
            .map(|(s, _)| s)
            .collect::<Vec<_>>(),
        ages2.into_iter().map(|(s, _)| s).collect::<Vec<_>>()
    );
    let (_, two, _) = scrape(
        &http,
        port,
        "/metrics?name[]=carpulse_polls_total&name[]=carpulse_vehicle_up",
    )
    .await;
    assert!(
        two.contains("# TYPE carpulse_polls_total counter")
            && two.contains("# TYPE carpulse_vehicle_up gauge")
            && !two.contains("carpulse_reading_age_seconds")
            && !two.contains("process_"),
        "{two}"
    );

    assert_eq!(daemon.terminate(Duration::from_secs(20)).await, Some(0));
    let _ = sim.terminate(Duration::from_secs(10)).await;
}
