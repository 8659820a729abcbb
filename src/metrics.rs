//! The Prometheus metrics of DESIGN §3 in one explicit struct (passed around, never global, so a
//! test builds its own and reads it), and the loopback HTTP listener serving `/metrics` and
//! `/healthz`. Tokens, secrets and VINs never become label values.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::domain::{
    BatteryReading, ChargeReading, ChargeState, OdometerReading, VehicleId, VehicleInfo,
};

/// Every family carpulse exports. Cloning is cheap (the families are reference-counted).
/// The states of `carpulse_vehicle_state` and `carpulse_vehicles`.
pub const VEHICLE_STATES: [&str; 4] = ["revoked", "no_data", "no_user_id", "needs_reauth"];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub soc_ratio: GaugeVec,
    pub range_meters: GaugeVec,
    pub plugged_in: GaugeVec,
    pub charge_state: GaugeVec,
    pub odometer_meters: GaugeVec,
    pub vehicle_info: GaugeVec,
    pub reading_timestamp: GaugeVec,
    pub reading_age: GaugeVec,
    pub vehicle_up: GaugeVec,
    pub token_expiry: GaugeVec,
    pub polls: IntCounterVec,
    pub poll_duration: HistogramVec,
    pub token_refreshes: IntCounterVec,
    pub connections: IntGaugeVec,
    pub rows_written: IntCounterVec,
    pub rows_dropped: IntCounterVec,
    pub rows_duplicate: IntCounterVec,
    pub ticks_skipped: IntCounterVec,
    pub polls_skipped: IntCounterVec,
    pub build_info: IntGaugeVec,
    /// v3 application token requests (API Authentication), by outcome.
    pub app_token_requests: IntCounterVec,
    pub app_token_expiry: prometheus::Gauge,
    /// 1 for a vehicle in a state that keeps it from being polled normally (`revoked`,
    /// `no_data`, `no_user_id`); the series is removed when the state ends.
    pub vehicle_state: GaugeVec,
    /// Fleet-wide counts of those states (always exported).
    pub vehicles_in_state: IntGaugeVec,
    /// The label set of each vehicle's info series, to replace it when make/model/year change
    /// (prometheus 0.14 cannot remove by partial labels).
    info_labels: Arc<std::sync::Mutex<std::collections::HashMap<VehicleId, [String; 4]>>>,
    /// The (vehicle, state) series of `carpulse_vehicle_state` now set, to remove when over.
    state_labels: Arc<std::sync::Mutex<std::collections::HashSet<(VehicleId, &'static str)>>>,
    /// Whether per-vehicle series are exported (`metrics.per_vehicle`); totals always are.
    per_vehicle: Arc<AtomicBool>,
}

fn gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<GaugeVec> {
    let g = GaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let r = Registry::new();
        let poll_duration = HistogramVec::new(
            HistogramOpts::new(
                "carpulse_poll_duration_seconds",
                "Wall time of one Smartcar request, by endpoint.",
            )
            // Smartcar answers in 3–45 s typically and up to 300 s; the simulator in milliseconds.
            .buckets(vec![0.05, 0.25, 1.0, 3.0, 10.0, 30.0, 60.0, 120.0, 300.0]),
            &["endpoint"],
        )?;
        r.register(Box::new(poll_duration.clone()))?;
        let connections = IntGaugeVec::new(
            Opts::new(
                "carpulse_connections",
                "Stored Smartcar connections by status.",
            ),
            &["status"],
        )?;
        r.register(Box::new(connections.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new("carpulse_build_info", "Always 1; the version as a label."),
            &["version"],
        )?;
        r.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let app_token_expiry = prometheus::Gauge::with_opts(Opts::new(
            "carpulse_app_token_expiry_timestamp_seconds",
            "When the v3 application token expires (unix seconds); 0 before the first.",
        ))?;
        r.register(Box::new(app_token_expiry.clone()))?;
        let vehicles_in_state = IntGaugeVec::new(
            Opts::new(
                "carpulse_vehicles",
                "Vehicles by a state that keeps them from normal polling: revoked (the connection is gone from Smartcar), no_data (Smartcar holds no signals), no_user_id (no Smartcar user id for API Authentication), needs_reauth (per-user tokens refused).",
            ),
            &["state"],
        )?;
        r.register(Box::new(vehicles_in_state.clone()))?;
        for state in VEHICLE_STATES {
            vehicles_in_state.with_label_values(&[state]).set(0);
        }
        let app_token_requests = counter(
            &r,
            "carpulse_app_token_requests_total",
            "Requests for the v3 application token, by outcome (ok, refused: carpulse's API credentials are wrong, error: network or server).",
            &["outcome"],
        )?;
        for outcome in ["ok", "refused", "error"] {
            app_token_requests.with_label_values(&[outcome]);
        }
        let v = &["vehicle_id"];
        Ok(Metrics {
            app_token_requests,
            app_token_expiry,
            vehicle_state: gauge(
                &r,
                "carpulse_vehicle_state",
                "1 while the vehicle is in that state (revoked, no_data, no_user_id, needs_reauth).",
                &["vehicle_id", "state"],
            )?,
            vehicles_in_state,
            soc_ratio: gauge(&r, "carpulse_battery_state_of_charge_ratio", "Traction battery state of charge, 0–1.", v)?,
            range_meters: gauge(&r, "carpulse_battery_range_meters", "Estimated electric range in metres.", v)?,
            plugged_in: gauge(&r, "carpulse_charge_plugged_in", "1 while a charging cable is connected.", v)?,
            charge_state: gauge(
                &r,
                "carpulse_charge_state",
                "1 for the current charging state, 0 for the others.",
                &["vehicle_id", "state"],
            )?,
            odometer_meters: gauge(&r, "carpulse_odometer_meters", "Odometer in metres.", v)?,
            vehicle_info: gauge(
                &r,
                "carpulse_vehicle_info",
                "Always 1; make, model and year as labels.",
                &["vehicle_id", "make", "model", "year"],
            )?,
            reading_timestamp: gauge(
                &r,
                "carpulse_reading_timestamp_seconds",
                "When the vehicle recorded the latest stored reading (unix seconds).",
                &["vehicle_id", "signal"],
            )?,
            polls: counter(&r, "carpulse_polls_total", "Smartcar requests by endpoint and outcome.", &["endpoint", "outcome"])?,
            poll_duration,
            token_refreshes: counter(&r, "carpulse_token_refreshes_total", "Token refreshes by outcome.", &["outcome"])?,
            connections,
            rows_written: counter(&r, "carpulse_rows_written_total", "Rows committed to the store, by table.", &["table"])?,
            rows_dropped: counter(
                &r,
                "carpulse_rows_dropped_total",
                "Fetched rows that could not be committed, by table.",
                &["table"],
            )?,
            rows_duplicate: counter(
                &r,
                "carpulse_rows_duplicate_total",
                "Fetched rows not stored again because that vehicle's reading at that time was stored already.",
                &["table"],
            )?,
            ticks_skipped: counter(
                &r,
                "carpulse_ticks_skipped_total",
                "Scheduled ticks skipped because the previous cycle of that job was still running.",
                &["job"],
            )?,
            reading_age: gauge(
                &r,
                "carpulse_reading_age_seconds",
                "Age of the latest stored reading at the vehicle (now - recorded_at), updated every 15 s.",
                &["vehicle_id", "signal"],
            )?,
            vehicle_up: gauge(
                &r,
                "carpulse_vehicle_up",
                "1 when the vehicle's last poll got an answer, 0 when it failed.",
                &["vehicle_id"],
            )?,
            token_expiry: gauge(
                &r,
                "carpulse_token_expiry_timestamp_seconds",
                "When each connection's access token expires (unix seconds).",
                &["connection"],
            )?,
            polls_skipped: counter(
                &r,
                "carpulse_polls_skipped_total",
                "Vehicle polls not made: paused, waiting out retry-after or a backoff, app throttled, or every endpoint disabled.",
                &["job", "reason"],
            )?,
            build_info,
            info_labels: Arc::default(),
            state_labels: Arc::default(),
            per_vehicle: Arc::new(AtomicBool::new(true)),
            registry: r,
        })
    }

    pub fn record_battery(&self, id: &VehicleId, r: &BatteryReading) {
        if !self.per_vehicle() {
            return;
        }
        let v = [id.0.as_str()];
        // Through centi-percent, the store's resolution: 99.9 % reads 0.999, not 0.9990000000000001.
        self.soc_ratio
            .with_label_values(&v)
            .set((r.soc_percent * 100.0).round() / 10_000.0);
        if let Some(km) = r.range_km {
            self.range_meters.with_label_values(&v).set(km * 1000.0);
        }
        self.reading_timestamp
            .with_label_values(&[id.0.as_str(), "battery"])
            .set(r.stamp.recorded_at as f64 / 1000.0);
    }

    pub fn record_charge(&self, id: &VehicleId, r: &ChargeReading) {
        if !self.per_vehicle() {
            return;
        }
        let v = [id.0.as_str()];
        self.plugged_in
            .with_label_values(&v)
            .set(if r.plugged_in { 1.0 } else { 0.0 });
        for s in ChargeState::ALL {
            let on = if s == r.state { 1.0 } else { 0.0 };
            self.charge_state
                .with_label_values(&[id.0.as_str(), s.as_str()])
                .set(on);
        }
        self.reading_timestamp
            .with_label_values(&[id.0.as_str(), "charge"])
            .set(r.stamp.recorded_at as f64 / 1000.0);
    }

    pub fn record_odometer(&self, id: &VehicleId, r: &OdometerReading) {
        if !self.per_vehicle() {
            return;
        }
        self.odometer_meters
            .with_label_values(&[id.0.as_str()])
            .set(r.odometer_km * 1000.0);
        self.reading_timestamp
            .with_label_values(&[id.0.as_str(), "odometer"])
            .set(r.stamp.recorded_at as f64 / 1000.0);
    }

    /// Replaces the vehicle's info series (a changed label set must not leave the old one behind).
    pub fn record_info(&self, id: &VehicleId, info: &VehicleInfo) {
        if !self.per_vehicle() {
            return;
        }
        let labels = [
            id.0.clone(),
            info.make.clone(),
            info.model.clone(),
            info.year.to_string(),
        ];
        let mut known = self.info_labels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = known.insert(id.clone(), labels.clone()) {
            if old != labels {
                let _ = self.vehicle_info.remove_label_values(&old);
            }
        }
        self.vehicle_info.with_label_values(&labels).set(1.0);
    }

    pub fn per_vehicle(&self) -> bool {
        self.per_vehicle.load(Ordering::Relaxed)
    }

    /// Turns per-vehicle series on or off; off drops the ones already exported.
    pub fn set_per_vehicle(&self, on: bool) {
        if !self.per_vehicle.swap(on, Ordering::Relaxed) || on {
            return;
        }
        for g in [
            &self.soc_ratio,
            &self.range_meters,
            &self.plugged_in,
            &self.charge_state,
            &self.odometer_meters,
            &self.vehicle_info,
            &self.reading_timestamp,
            &self.reading_age,
            &self.vehicle_up,
        ] {
            g.reset();
        }
        self.info_labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Drops every series of a vehicle that is no longer polled.
    /// Sets `carpulse_vehicle_state` and `carpulse_vehicles` to exactly `states`; a vehicle's
    /// series goes when its state ends.
    pub fn set_vehicle_states(&self, states: &[(VehicleId, &'static str)]) {
        for state in VEHICLE_STATES {
            let n = states.iter().filter(|(_, s)| *s == state).count();
            self.vehicles_in_state
                .with_label_values(&[state])
                .set(n as i64);
        }
        let now: std::collections::HashSet<(VehicleId, &'static str)> = if self.per_vehicle() {
            states.iter().cloned().collect()
        } else {
            Default::default()
        };
        let mut set = self.state_labels.lock().unwrap_or_else(|p| p.into_inner());
        for (id, state) in set.difference(&now) {
            let _ = self
                .vehicle_state
                .remove_label_values(&[id.0.as_str(), state]);
        }
        for (id, state) in &now {
            self.vehicle_state
                .with_label_values(&[id.0.as_str(), state])
                .set(1.0);
        }
        *set = now;
    }

    pub fn forget_vehicle(&self, id: &VehicleId) {
        let v = id.0.as_str();
        for g in [
            &self.soc_ratio,
            &self.range_meters,
            &self.plugged_in,
            &self.odometer_meters,
            &self.vehicle_up,
        ] {
            let _ = g.remove_label_values(&[v]);
        }
        for s in ChargeState::ALL {
            let _ = self.charge_state.remove_label_values(&[v, s.as_str()]);
        }
        for signal in ["battery", "charge", "odometer"] {
            let _ = self.reading_timestamp.remove_label_values(&[v, signal]);
            let _ = self.reading_age.remove_label_values(&[v, signal]);
        }
        let old = self
            .info_labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(old) = old {
            let _ = self.vehicle_info.remove_label_values(&old);
        }
    }

    pub fn set_connections(&self, counts: &[(&str, i64)]) {
        self.connections.reset();
        for (status, n) in counts {
            self.connections.with_label_values(&[status]).set(*n);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// What `/healthz` reports; the daemon updates it.
pub type Health = Arc<std::sync::Mutex<HealthState>>;

#[derive(Default, Debug, Clone)]
pub struct HealthState {
    /// Human-readable problems; empty means healthy.
    pub problems: Vec<String>,
}

#[derive(Clone)]
struct ServerState {
    metrics: Metrics,
    health: Health,
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .with_state(ServerState { metrics, health });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn metrics_handler(State(s): State<ServerState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn health_handler(State(s): State<ServerState>) -> impl IntoResponse {
    // A poisoned lock only means a panic elsewhere; the data is still a list of strings.
    let problems = match s.health.lock() {
        Ok(h) => h.problems.clone(),
        Err(p) => p.into_inner().problems.clone(),
    };
    if problems.is_empty() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", problems.join("\n")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Stamp;

    #[test]
    fn readings_become_series() {
        let m = Metrics::new().unwrap();
        let id = VehicleId("v1".into());
        let stamp = Stamp {
            recorded_at: 1_700_000_000_000,
            fetched_at: 1_700_000_001_000,
        };
        m.record_battery(
            &id,
            &BatteryReading {
                stamp,
                soc_percent: 68.5,
                range_km: Some(312.4),
            },
        );
        m.record_charge(
            &id,
            &ChargeReading {
                stamp,
                plugged_in: true,
                state: ChargeState::Charging,
            },
        );
        let text = m.render();
        assert!(
            text.contains("carpulse_battery_state_of_charge_ratio{vehicle_id=\"v1\"} 0.685"),
            "{text}"
        );
        assert!(
            text.contains("carpulse_battery_range_meters{vehicle_id=\"v1\"} 312400"),
            "{text}"
        );
        assert!(
            text.contains("carpulse_charge_state{state=\"CHARGING\",vehicle_id=\"v1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("carpulse_charge_state{state=\"NOT_CHARGING\",vehicle_id=\"v1\"} 0"),
            "{text}"
        );
        assert!(text.contains(
            "carpulse_reading_timestamp_seconds{signal=\"battery\",vehicle_id=\"v1\"} 1700000000"
        ));
        assert!(text.contains("carpulse_build_info{version=\""));
        m.record_info(
            &id,
            &VehicleInfo {
                make: "TESLA".into(),
                model: "Model 3".into(),
                year: 2021,
            },
        );
        m.record_info(
            &id,
            &VehicleInfo {
                make: "TESLA".into(),
                model: "Model Y".into(),
                year: 2022,
            },
        );
        let text = m.render();
        assert!(
            !text.contains("Model 3"),
            "the old info series must go: {text}"
        );
        assert!(text.contains("model=\"Model Y\""));
        m.forget_vehicle(&id);
        assert!(!m.render().contains("vehicle_id=\"v1\""));

        // Switched off, per-vehicle series go and stay away; totals remain.
        m.record_odometer(
            &id,
            &OdometerReading {
                stamp,
                odometer_km: 1.0,
            },
        );
        m.polls.with_label_values(&["battery", "ok"]).inc();
        m.set_per_vehicle(false);
        m.record_battery(
            &id,
            &BatteryReading {
                stamp,
                soc_percent: 1.0,
                range_km: None,
            },
        );
        let text = m.render();
        assert!(!text.contains("vehicle_id="), "{text}");
        assert!(text.contains("carpulse_polls_total{endpoint=\"battery\",outcome=\"ok\"} 1"));
    }
}
