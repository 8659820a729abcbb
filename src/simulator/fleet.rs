//! The simulated fleet: users, their vehicles, and the model that says what a car (BEV, PHEV or
//! ICE) reports at a given moment.
//!
//! Everything here is derived from the seed, so the same seed gives the same ids, VINs and
//! vehicles across restarts. A vehicle stores only a handful of parameters, never a history: the
//! value of any signal is a pure function of (parameters, report time). That keeps 10,000
//! vehicles cheap and makes two requests in one report window answer identically. Even sleep is
//! such a function: whether a car is asleep, and since when, follows from where the report time
//! falls in its simulated day.

use std::collections::HashMap;

use crate::domain::{ChargeState, UnixMillis};

/// What moves the car, which decides the endpoints and signals it can answer: a BEV has no fuel
/// or engine oil, an ICE has no traction battery or charging, a PHEV has both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Powertrain {
    /// Battery electric.
    Bev,
    /// Plug-in hybrid: a small battery used first, then the engine.
    Phev,
    /// Internal combustion engine only.
    Ice,
}

impl Powertrain {
    /// v3 `powertrainType`.
    pub fn as_str(self) -> &'static str {
        match self {
            Powertrain::Bev => "BEV",
            Powertrain::Phev => "PHEV",
            Powertrain::Ice => "ICE",
        }
    }

    /// Has a traction battery and a charge port (`/battery`, `/charge`, `tractionbattery-*`).
    pub fn has_battery(self) -> bool {
        matches!(self, Powertrain::Bev | Powertrain::Phev)
    }

    /// Has a fuel tank and an engine (`/fuel`, `/engine/oil`, `internalcombustionengine-*`).
    pub fn has_engine(self) -> bool {
        matches!(self, Powertrain::Phev | Powertrain::Ice)
    }
}

/// A real car the fleet is drawn from: make/model, plausible model years, usable battery (kWh)
/// and efficiency (km per kWh), tank (L) and consumption (L/100 km), so range and consumption
/// are believable per car. Battery fields are 0 for an ICE, tank fields 0 for a BEV.
struct CatalogEntry {
    make: &'static str,
    model: &'static str,
    years: (i32, i32),
    capacity_kwh: f64,
    km_per_kwh: f64,
    tank_l: f64,
    l_per_100km: f64,
    /// World manufacturer identifier, the first three VIN characters.
    wmi: &'static str,
}

const fn bev(
    make: &'static str,
    model: &'static str,
    years: (i32, i32),
    capacity_kwh: f64,
    km_per_kwh: f64,
    wmi: &'static str,
) -> CatalogEntry {
    CatalogEntry {
        make,
        model,
        years,
        capacity_kwh,
        km_per_kwh,
        tank_l: 0.0,
        l_per_100km: 0.0,
        wmi,
    }
}

const fn ice(
    make: &'static str,
    model: &'static str,
    years: (i32, i32),
    tank_l: f64,
    l_per_100km: f64,
    wmi: &'static str,
) -> CatalogEntry {
    CatalogEntry {
        make,
        model,
        years,
        capacity_kwh: 0.0,
        km_per_kwh: 0.0,
        tank_l,
        l_per_100km,
        wmi,
    }
}

const BEV_CATALOG: &[CatalogEntry] = &[
    bev("TESLA", "Model 3", (2019, 2025), 75.0, 6.5, "5YJ"),
    bev("TESLA", "Model Y", (2020, 2025), 75.0, 6.0, "7SA"),
    bev("VOLKSWAGEN", "ID.4", (2021, 2025), 77.0, 5.5, "WVG"),
    bev("HYUNDAI", "IONIQ 5", (2022, 2025), 77.4, 5.8, "KM8"),
    bev("FORD", "Mustang Mach-E", (2021, 2025), 88.0, 5.2, "3FM"),
    bev("CHEVROLET", "Bolt EV", (2019, 2023), 65.0, 6.3, "1G1"),
    bev("NISSAN", "LEAF", (2018, 2024), 40.0, 6.4, "1N4"),
    bev("KIA", "EV6", (2022, 2025), 77.4, 5.9, "KND"),
    bev("BMW", "i4", (2022, 2025), 81.0, 6.1, "WBY"),
    bev("POLESTAR", "2", (2021, 2025), 78.0, 5.6, "LPS"),
    bev("AUDI", "Q4 e-tron", (2022, 2025), 77.0, 5.3, "WAU"),
];

/// Plug-in hybrids: a battery good for 60–90 km, then the engine.
const PHEV_CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        make: "TOYOTA",
        model: "RAV4 Prime",
        years: (2021, 2025),
        capacity_kwh: 18.1,
        km_per_kwh: 4.2,
        tank_l: 55.0,
        l_per_100km: 6.0,
        wmi: "JTM",
    },
    CatalogEntry {
        make: "BMW",
        model: "X5 xDrive45e",
        years: (2020, 2023),
        capacity_kwh: 24.0,
        km_per_kwh: 3.6,
        tank_l: 69.0,
        l_per_100km: 8.5,
        wmi: "5UX",
    },
    CatalogEntry {
        make: "MITSUBISHI",
        model: "Outlander PHEV",
        years: (2019, 2025),
        capacity_kwh: 20.0,
        km_per_kwh: 3.4,
        tank_l: 56.0,
        l_per_100km: 7.5,
        wmi: "JA4",
    },
    CatalogEntry {
        make: "VOLVO",
        model: "XC60 Recharge",
        years: (2020, 2025),
        capacity_kwh: 18.8,
        km_per_kwh: 3.9,
        tank_l: 71.0,
        l_per_100km: 7.8,
        wmi: "YV4",
    },
];

const ICE_CATALOG: &[CatalogEntry] = &[
    ice("FORD", "F-150", (2018, 2025), 98.0, 12.4, "1FT"),
    ice("TOYOTA", "Camry", (2018, 2025), 60.0, 7.4, "4T1"),
    ice("HONDA", "Civic", (2019, 2025), 47.0, 6.7, "2HG"),
    ice("VOLKSWAGEN", "Golf", (2018, 2024), 50.0, 6.0, "WVW"),
];

/// Home locations (lat, lon) the cars park at.
const HOMES: &[(f64, f64)] = &[
    (37.7749, -122.4194),
    (52.5200, 13.4050),
    (48.1351, 11.5820),
    (40.7128, -74.0060),
    (47.6062, -122.3321),
    (59.3293, 18.0686),
    (39.7392, -104.9903),
    (51.5072, -0.1276),
];

/// Length of one simulated day: parked, a trip, parked, then charging (or a fuel stop).
const CYCLE_S: f64 = 86_400.0;
const DRIVE_START_S: f64 = 8.0 * 3600.0;
/// When EVs plug in and ICE cars stop for fuel.
const PLUG_IN_S: f64 = 18.0 * 3600.0;
const SPEED_KMH: f64 = 60.0;
/// Parked drain, percent of the battery per simulated hour.
const PARKED_DRAIN_PCT_H: f64 = 0.05;
/// A car parked (not driving, not plugged in) longer than this stops reporting, as real cars
/// put their telematics unit to sleep to save the 12 V battery.
const SLEEP_AFTER_S: f64 = 2.0 * 3600.0;
/// A PHEV switches to the engine at this state of charge (the hybrid buffer it keeps).
const PHEV_MIN_SOC_PCT: f64 = 15.0;
/// Distance between oil changes; oil life falls linearly over it.
const OIL_INTERVAL_KM: f64 = 15_000.0;
/// Tyres warm up (and pressure rises) while driving.
const TIRE_WARM_KPA: f64 = 8.0;
const KM_PER_MILE: f64 = 1.609_344;
const LITRES_PER_US_GALLON: f64 = 3.785_411_784;
const KPA_PER_PSI: f64 = 6.894_757_293;

/// splitmix64: a tiny, well-mixed deterministic generator, enough to derive ids and parameters
/// from the seed without pulling in a seeded RNG whose output might change between crate versions.
pub(crate) struct SeedRng(u64);

impl SeedRng {
    pub(crate) fn new(seed: u64, domain: u64, index: u64) -> Self {
        let mut rng = SeedRng(seed ^ domain.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        rng.0 ^= rng
            .next_u64()
            .wrapping_add(index.wrapping_mul(0xBF58_476D_1CE4_E5B9));
        rng
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    /// A version-4-shaped UUID string (Smartcar ids and tokens look like this).
    pub(crate) fn uuid(&mut self) -> String {
        format_uuid(((self.next_u64() as u128) << 64) | self.next_u64() as u128)
    }
}

/// Formats 128 bits as a v4 UUID (`8-4-4-4-12` lower-case hex with version and variant bits).
pub(crate) fn format_uuid(bits: u128) -> String {
    let v = (bits & !(0xF000u128 << 64) | (0x4000u128 << 64)) & !(0xC000u128 << 48)
        | (0x8000u128 << 48);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A random (not seeded) UUID, for tokens, codes and request ids.
pub(crate) fn random_uuid() -> String {
    format_uuid(rand::random::<u128>())
}

/// One simulated car. Only parameters live here; [`Vehicle::state_at`] derives the rest.
#[derive(Debug)]
pub(crate) struct Vehicle {
    pub(crate) id: String,
    pub(crate) vin: String,
    pub(crate) make: &'static str,
    pub(crate) model: &'static str,
    pub(crate) year: i32,
    pub(crate) powertrain: Powertrain,
    /// Usable battery, kWh (0 for an ICE).
    pub(crate) capacity_kwh: f64,
    km_per_kwh: f64,
    /// Fuel tank, litres (0 for a BEV).
    pub(crate) tank_l: f64,
    l_per_100km: f64,
    /// Charge limit, percent.
    pub(crate) charge_limit_pct: f64,
    charger_kw: f64,
    trip_km: f64,
    base_odometer_km: f64,
    /// Kilometres since the last oil change at odometer 0, so oil life differs between cars.
    oil_offset_km: f64,
    /// Cold tyre pressures, kPa: front left, front right, back left, back right.
    tire_kpa: [f64; 4],
    home: (f64, f64),
    /// Compass bearing of the daily trip, degrees.
    trip_bearing: f64,
    /// Where in the daily cycle this car is at the simulation's start, simulated seconds.
    phase_s: f64,
    /// Offset of this car's report grid, ms in [0, report_interval).
    report_offset_ms: i64,
}

/// Fuel in the tank, already rounded the way it is served.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct FuelState {
    /// 0–100, 2 decimals.
    pub(crate) percent: f64,
    /// Litres, 2 decimals.
    pub(crate) litres: f64,
    /// Kilometres on the remaining fuel, 1 decimal.
    pub(crate) range_km: f64,
}

/// What a vehicle reports at one report time, already rounded the way it is served.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct VehicleState {
    /// Unix ms of the report (`sc-data-age`, `oemUpdatedAt`). For a sleeping car, its last
    /// report before it fell asleep.
    pub(crate) report_ms: UnixMillis,
    /// Traction battery, 0–100, 2 decimals (0 for an ICE, which never serves it).
    pub(crate) soc_percent: f64,
    /// Electric range, kilometres, 1 decimal (0 for an ICE).
    pub(crate) range_km: f64,
    /// Kilometres, 1 decimal.
    pub(crate) odometer_km: f64,
    pub(crate) plugged_in: bool,
    pub(crate) charge_state: ChargeState,
    /// Minutes until the charge limit is reached (0 unless charging).
    pub(crate) minutes_to_complete: i64,
    pub(crate) charge_power_kw: f64,
    pub(crate) latitude: f64,
    pub(crate) longitude: f64,
    pub(crate) heading: f64,
    pub(crate) at_home: bool,
    /// 12 V battery, percent, 1 decimal.
    pub(crate) low_voltage_soc: f64,
    /// `None` without a fuel tank (BEV).
    pub(crate) fuel: Option<FuelState>,
    /// Engine oil life left, fraction 0–1 with 4 decimals; `None` without an engine.
    pub(crate) oil_life: Option<f64>,
    /// Tyre pressures, kPa with 1 decimal: front left, front right, back left, back right.
    pub(crate) tire_kpa: [f64; 4],
}

/// The clock the model runs on: which real instant is simulated time zero and how fast it runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SimClock {
    pub(crate) anchor_ms: UnixMillis,
    pub(crate) time_scale: f64,
    pub(crate) report_interval_ms: i64,
    /// Cars parked longer than [`SLEEP_AFTER_S`] fall asleep (`--sleeping-cars`). Off by default
    /// so a fleet always has fresh data for tests that expect every car to report.
    pub(crate) sleeping: bool,
}

impl Vehicle {
    fn generate(seed: u64, index: u64, report_interval_ms: i64, powertrain: Powertrain) -> Vehicle {
        // The order of draws is that of the BEV-only simulator, so an all-BEV fleet keeps its
        // ids, VINs and trajectories for a given seed; new parameters are drawn after them.
        let mut rng = SeedRng::new(seed, 2, index);
        let id = rng.uuid();
        let catalog = match powertrain {
            Powertrain::Bev => BEV_CATALOG,
            Powertrain::Phev => PHEV_CATALOG,
            Powertrain::Ice => ICE_CATALOG,
        };
        let entry = &catalog[rng.below(catalog.len() as u64) as usize];
        let year = entry.years.0 + rng.below((entry.years.1 - entry.years.0 + 1) as u64) as i32;
        let vin = make_vin(entry.wmi, year, &mut rng);
        let limits = match powertrain {
            Powertrain::Phev => [90.0, 100.0, 100.0, 100.0],
            _ => [80.0, 80.0, 90.0, 100.0],
        };
        let charge_limit_pct = limits[rng.below(4) as usize];
        let chargers = match powertrain {
            Powertrain::Phev => [3.3, 7.4],
            _ => [7.4, 11.0],
        };
        let charger_kw = chargers[rng.below(2) as usize];
        // At most half the battery (BEV) or tank (PHEV, ICE) per trip, so levels stay plausible.
        let max_trip = match powertrain {
            Powertrain::Bev => 0.5 * entry.capacity_kwh * entry.km_per_kwh,
            Powertrain::Phev | Powertrain::Ice => 0.5 * entry.tank_l / entry.l_per_100km * 100.0,
        };
        let trip_km = (20.0 + rng.unit() * 130.0).min(max_trip);
        let base_odometer_km = (5_000.0 + rng.unit() * 55_000.0).round();
        let (lat, lon) = HOMES[rng.below(HOMES.len() as u64) as usize];
        let home = (
            lat + (rng.unit() - 0.5) * 0.1,
            lon + (rng.unit() - 0.5) * 0.1,
        );
        let trip_bearing = rng.unit() * 360.0;
        let phase_s = rng.unit() * CYCLE_S;
        let report_offset_ms = rng.below(report_interval_ms.max(1) as u64) as i64;
        let oil_offset_km = rng.unit() * OIL_INTERVAL_KM;
        // 224–236 kPa cold, ±3 per wheel: with the warm-up, always within 220–250.
        let tire_base = 224.0 + rng.unit() * 12.0;
        let mut tire_kpa = [0.0; 4];
        for wheel in &mut tire_kpa {
            *wheel = tire_base + (rng.unit() - 0.5) * 6.0;
        }
        Vehicle {
            id,
            vin,
            make: entry.make,
            model: entry.model,
            year,
            powertrain,
            capacity_kwh: entry.capacity_kwh,
            km_per_kwh: entry.km_per_kwh,
            tank_l: entry.tank_l,
            l_per_100km: entry.l_per_100km,
            charge_limit_pct,
            charger_kw,
            trip_km,
            base_odometer_km,
            oil_offset_km,
            tire_kpa,
            home,
            trip_bearing,
            phase_s,
            report_offset_ms,
        }
    }

    /// The latest report time ≤ `now_ms` on this car's report grid.
    pub(crate) fn report_time(&self, clock: &SimClock, now_ms: UnixMillis) -> UnixMillis {
        let interval = clock.report_interval_ms.max(1);
        (now_ms - self.report_offset_ms).div_euclid(interval) * interval + self.report_offset_ms
    }

    /// What the car reports at the latest report time ≤ `now_ms`.
    pub(crate) fn state_now(&self, clock: &SimClock, now_ms: UnixMillis) -> VehicleState {
        self.state_at(clock, self.report_time(clock, now_ms))
    }

    /// What the car reports at `report_ms`: its awake state, or, when it sleeps, what it
    /// reported last before falling asleep (same report time, same values).
    pub(crate) fn state_at(&self, clock: &SimClock, report_ms: UnixMillis) -> VehicleState {
        let at = self
            .last_report_before_sleep(clock, report_ms)
            .unwrap_or(report_ms);
        self.awake_state_at(clock, at)
    }

    /// Simulated seconds since this car's cycle origin at the real instant `ms`. Instants before
    /// the anchor are allowed (negative elapsed time) so a car that fell asleep before the
    /// simulator started still has a well-defined last report.
    fn sim_seconds(&self, clock: &SimClock, ms: UnixMillis) -> f64 {
        (ms - clock.anchor_ms) as f64 / 1000.0 * clock.time_scale + self.phase_s
    }

    fn drive_end_s(&self) -> f64 {
        DRIVE_START_S + self.trip_km / SPEED_KMH * 3600.0
    }

    /// When the current parked spell began (seconds into the day; negative = the day before),
    /// or `None` while driving or plugged in. An ICE's fuel stop at [`PLUG_IN_S`] wakes it.
    fn parked_since(&self, t: f64) -> Option<f64> {
        let drive_end = self.drive_end_s();
        if (DRIVE_START_S..drive_end).contains(&t) {
            return None;
        }
        if t >= drive_end && t < PLUG_IN_S {
            return Some(drive_end);
        }
        if self.powertrain.has_battery() {
            // Plugged in from PLUG_IN_S to midnight, then parked until the morning trip.
            (t < DRIVE_START_S).then_some(0.0)
        } else if t >= PLUG_IN_S {
            Some(PLUG_IN_S)
        } else {
            Some(PLUG_IN_S - CYCLE_S)
        }
    }

    /// For a sleeping car, the last report time before it fell asleep; `None` when awake.
    /// Frozen time (`time_scale` 0) never sleeps: the car would have to have slept forever.
    fn last_report_before_sleep(&self, clock: &SimClock, report_ms: UnixMillis) -> Option<i64> {
        if !clock.sleeping || clock.time_scale <= 0.0 || !clock.time_scale.is_finite() {
            return None;
        }
        let sim_s = self.sim_seconds(clock, report_ms);
        let cycles = (sim_s / CYCLE_S).floor();
        let t = sim_s - cycles * CYCLE_S;
        let since = self.parked_since(t)?;
        if t - since <= SLEEP_AFTER_S {
            return None;
        }
        let asleep_sim_s = cycles * CYCLE_S + since + SLEEP_AFTER_S;
        let asleep_ms =
            clock.anchor_ms as f64 + (asleep_sim_s - self.phase_s) / clock.time_scale * 1000.0;
        Some(self.report_time(clock, asleep_ms.floor() as i64))
    }

    /// The model: a simulated day of parked → driving → parked → charging (EV) or a fuel stop
    /// (ICE; a PHEV does both), which ends where it started (at the charge limit, with a full
    /// tank), so no history is needed to know any moment's values.
    fn awake_state_at(&self, clock: &SimClock, report_ms: UnixMillis) -> VehicleState {
        let sim_s = self.sim_seconds(clock, report_ms);
        let cycles = (sim_s / CYCLE_S).floor();
        let t = sim_s - cycles * CYCLE_S;

        let drive_end = self.drive_end_s();
        let driving = (DRIVE_START_S..drive_end).contains(&t);
        let km_today = if t < DRIVE_START_S {
            0.0
        } else if driving {
            (t - DRIVE_START_S) / 3600.0 * SPEED_KMH
        } else {
            self.trip_km
        };

        let limit = self.charge_limit_pct;
        let drain = |seconds: f64| PARKED_DRAIN_PCT_H * seconds / 3600.0;
        let soc_at_drive_start = limit - drain(DRIVE_START_S);
        let pct_per_km = if self.powertrain.has_battery() {
            100.0 / (self.capacity_kwh * self.km_per_kwh)
        } else {
            0.0
        };
        // How far the battery carries the car today; a PHEV then switches to the engine.
        let electric_km_max = match self.powertrain {
            Powertrain::Bev => f64::INFINITY,
            Powertrain::Phev => (soc_at_drive_start - PHEV_MIN_SOC_PCT).max(0.0) / pct_per_km,
            Powertrain::Ice => 0.0,
        };
        let electric_km = km_today.min(electric_km_max);
        let fuel_km = km_today - electric_km;

        let mut plugged_in = false;
        let mut charge_state = ChargeState::NotCharging;
        let mut minutes_to_complete = 0;
        let mut charge_power_kw = 0.0;
        let mut soc = 0.0;
        if self.powertrain.has_battery() {
            let soc_after_trip =
                soc_at_drive_start - self.trip_km.min(electric_km_max) * pct_per_km;
            let soc_at_plug_in = soc_after_trip - drain(PLUG_IN_S - drive_end);
            let deficit = limit - soc_at_plug_in;
            // Fast enough to always reach the limit before the day ends.
            let charge_pct_h = (self.charger_kw / self.capacity_kwh * 100.0).max(deficit / 5.0);
            if t < DRIVE_START_S {
                soc = limit - drain(t);
            } else if driving {
                soc = soc_at_drive_start - electric_km * pct_per_km;
            } else if t < PLUG_IN_S {
                soc = soc_after_trip - drain(t - drive_end);
            } else {
                plugged_in = true;
                let charged = soc_at_plug_in + charge_pct_h * (t - PLUG_IN_S) / 3600.0;
                if charged < limit {
                    soc = charged;
                    charge_state = ChargeState::Charging;
                    charge_power_kw = self.charger_kw;
                    minutes_to_complete = ((limit - charged) / charge_pct_h * 60.0).ceil() as i64;
                } else {
                    soc = limit;
                    charge_state = ChargeState::FullyCharged;
                }
            }
        }
        let soc_percent = round_to(soc.clamp(0.0, 100.0), 2);
        let range_km = round_to(soc_percent / 100.0 * self.capacity_kwh * self.km_per_kwh, 1);
        let odometer_km = round_to(self.base_odometer_km + cycles * self.trip_km + km_today, 1);

        let fuel = self.powertrain.has_engine().then(|| {
            // Full from the evening fuel stop until the trip burns some.
            let litres = if t >= PLUG_IN_S {
                self.tank_l
            } else {
                (self.tank_l - fuel_km * self.l_per_100km / 100.0).max(0.0)
            };
            FuelState {
                percent: round_to(litres / self.tank_l * 100.0, 2),
                litres: round_to(litres, 2),
                range_km: round_to(litres / self.l_per_100km * 100.0, 1),
            }
        });
        let oil_life = self.powertrain.has_engine().then(|| {
            let used = (odometer_km + self.oil_offset_km).rem_euclid(OIL_INTERVAL_KM);
            round_to(1.0 - used / OIL_INTERVAL_KM, 4)
        });
        let warm = if driving { TIRE_WARM_KPA } else { 0.0 };
        let tire_kpa = self.tire_kpa.map(|p| round_to(p + warm, 1));

        // The trip goes out and comes back along one bearing.
        let (distance_from_home, heading) = if driving {
            let half = self.trip_km / 2.0;
            if km_today <= half {
                (km_today, self.trip_bearing)
            } else {
                (self.trip_km - km_today, (self.trip_bearing + 180.0) % 360.0)
            }
        } else {
            (0.0, self.trip_bearing)
        };
        let bearing = self.trip_bearing.to_radians();
        let latitude = self.home.0 + distance_from_home * bearing.cos() / 111.0;
        let longitude = self.home.1
            + distance_from_home * bearing.sin() / (111.0 * self.home.0.to_radians().cos());
        let low_voltage_soc = round_to(
            if driving || plugged_in {
                92.0
            } else {
                90.0 - 4.0 * (t / CYCLE_S)
            },
            1,
        );

        VehicleState {
            report_ms,
            soc_percent,
            range_km,
            odometer_km,
            plugged_in,
            charge_state,
            minutes_to_complete,
            charge_power_kw,
            latitude: round_to(latitude, 6),
            longitude: round_to(longitude, 6),
            heading: round_to(heading, 1),
            at_home: !driving,
            low_voltage_soc,
            fuel,
            oil_life,
            tire_kpa,
        }
    }
}

/// Rounds to `decimals` places (half away from zero).
pub(crate) fn round_to(value: f64, decimals: i32) -> f64 {
    let factor = 10f64.powi(decimals);
    (value * factor).round() / factor
}

/// Kilometres to miles, for `sc-unit-system: imperial`.
pub(crate) fn km_to_miles(km: f64) -> f64 {
    km / KM_PER_MILE
}

/// Litres to US gallons, for `sc-unit-system: imperial`.
pub(crate) fn litres_to_us_gallons(litres: f64) -> f64 {
    litres / LITRES_PER_US_GALLON
}

/// kPa to psi, for `sc-unit-system: imperial`.
pub(crate) fn kpa_to_psi(kpa: f64) -> f64 {
    kpa / KPA_PER_PSI
}

/// The powertrain of vehicle `index`: the list is walked round-robin from a seed-chosen start, so
/// the mix follows the list's proportions exactly (`bev,phev,ice` over three cars gives one of
/// each; `bev,bev,ice` gives two BEVs per ICE) and the same seed gives the same cars. An empty
/// list means BEV, the simulator's historical fleet.
fn pick_powertrain(seed: u64, index: u64, powertrains: &[Powertrain]) -> Powertrain {
    if powertrains.is_empty() {
        return Powertrain::Bev;
    }
    let len = powertrains.len() as u64;
    let start = SeedRng::new(seed, 3, 0).below(len);
    powertrains[((start + index % len) % len) as usize]
}

/// A 17-character VIN: WMI, five descriptor characters, the ISO 3779 check digit, the model-year
/// code, a plant code and a six-digit serial. The check digit is real so validators accept it.
fn make_vin(wmi: &str, year: i32, rng: &mut SeedRng) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPRSTUVWXYZ0123456789";
    const YEAR_CODES: &[u8] = b"ABCDEFGHJKLMNPRSTVWXY123456789";
    let mut chars: Vec<u8> = wmi.bytes().collect();
    for _ in 0..5 {
        chars.push(ALPHABET[rng.below(ALPHABET.len() as u64) as usize]);
    }
    chars.push(b'0');
    // Year codes cycle every 30 years starting at 1980 = 'A' (2010 = 'A' again).
    chars.push(YEAR_CODES[((year - 1980).rem_euclid(30)) as usize]);
    chars.push(ALPHABET[rng.below(ALPHABET.len() as u64) as usize]);
    for _ in 0..6 {
        chars.push(b'0' + rng.below(10) as u8);
    }
    chars[8] = vin_check_digit(&chars);
    chars.into_iter().map(char::from).collect()
}

fn vin_check_digit(chars: &[u8]) -> u8 {
    const WEIGHTS: [u32; 17] = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2];
    let value = |c: u8| -> u32 {
        match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'H' => u32::from(c - b'A') + 1,
            b'J'..=b'N' => u32::from(c - b'J') + 1,
            b'P' => 7,
            b'R'..=b'Z' => u32::from(c - b'R') + 9,
            _ => 0,
        }
    };
    let sum: u32 = chars.iter().zip(WEIGHTS).map(|(&c, w)| value(c) * w).sum();
    match sum % 11 {
        10 => b'X',
        n => b'0' + n as u8,
    }
}

/// One simulated account: its id and the vehicles its consent covers.
#[derive(Debug)]
pub(crate) struct User {
    pub(crate) id: String,
    pub(crate) vehicles: Vec<Vehicle>,
}

/// All users and vehicles, with indexes for the lookups every request makes.
#[derive(Debug)]
pub(crate) struct Fleet {
    pub(crate) users: Vec<User>,
    user_index: HashMap<String, usize>,
    /// vehicle id → (user index, vehicle index within the user)
    vehicle_index: HashMap<String, (usize, usize)>,
}

impl Fleet {
    pub(crate) fn generate(
        seed: u64,
        users: usize,
        vehicles_per_user: usize,
        report_interval_ms: i64,
        powertrains: &[Powertrain],
    ) -> Fleet {
        let mut all = Vec::with_capacity(users);
        for u in 0..users {
            let id = SeedRng::new(seed, 1, u as u64).uuid();
            let vehicles = (0..vehicles_per_user)
                .map(|v| {
                    let index = (u * vehicles_per_user + v) as u64;
                    let powertrain = pick_powertrain(seed, index, powertrains);
                    Vehicle::generate(seed, index, report_interval_ms, powertrain)
                })
                .collect();
            all.push(User { id, vehicles });
        }
        let user_index = all
            .iter()
            .enumerate()
            .map(|(i, u)| (u.id.clone(), i))
            .collect();
        let vehicle_index = all
            .iter()
            .enumerate()
            .flat_map(|(ui, u)| {
                u.vehicles
                    .iter()
                    .enumerate()
                    .map(move |(vi, v)| (v.id.clone(), (ui, vi)))
            })
            .collect();
        Fleet {
            users: all,
            user_index,
            vehicle_index,
        }
    }

    pub(crate) fn user_by_id(&self, id: &str) -> Option<usize> {
        self.user_index.get(id).copied()
    }

    /// Where the vehicle sits: (index of its owner, index among the owner's vehicles).
    pub(crate) fn vehicle_position(&self, id: &str) -> Option<(usize, usize)> {
        self.vehicle_index.get(id).copied()
    }

    /// The vehicle and the index of the user owning it.
    pub(crate) fn vehicle(&self, id: &str) -> Option<(usize, &Vehicle)> {
        let &(ui, vi) = self.vehicle_index.get(id)?;
        Some((ui, &self.users[ui].vehicles[vi]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Powertrain; 3] = [Powertrain::Bev, Powertrain::Phev, Powertrain::Ice];

    fn clock() -> SimClock {
        SimClock {
            anchor_ms: 1_700_000_000_000,
            time_scale: 60.0,
            report_interval_ms: 5_000,
            sleeping: true,
        }
    }

    #[test]
    fn same_seed_same_fleet_and_different_seed_differs() {
        let a = Fleet::generate(7, 3, 2, 5_000, &[Powertrain::Bev]);
        let b = Fleet::generate(7, 3, 2, 5_000, &[Powertrain::Bev]);
        let c = Fleet::generate(8, 3, 2, 5_000, &[Powertrain::Bev]);
        let ids = |f: &Fleet| {
            f.users
                .iter()
                .flat_map(|u| u.vehicles.iter().map(|v| v.id.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), ids(&b));
        assert_ne!(ids(&a), ids(&c));
        assert_eq!(a.users[1].id, b.users[1].id);
        let mut unique = ids(&a);
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 6);
    }

    #[test]
    fn ids_are_uuids_and_vins_are_valid() {
        let fleet = Fleet::generate(1, 2, 3, 5_000, &ALL);
        for v in fleet.users.iter().flat_map(|u| &u.vehicles) {
            assert_eq!(v.id.len(), 36);
            assert_eq!(v.id.as_bytes()[14], b'4');
            assert_eq!(v.vin.len(), 17);
            assert!(!v.vin.contains(['I', 'O', 'Q']));
            assert_eq!(v.vin.as_bytes()[8], vin_check_digit(v.vin.as_bytes()));
        }
        // A known-valid VIN from the ISO 3779 examples.
        assert_eq!(vin_check_digit(b"1M8GDM9AXKP042788"), b'X');
    }

    #[test]
    fn a_day_covers_every_phase_with_plausible_values() {
        let fleet = Fleet::generate(3, 4, 3, 5_000, &ALL);
        for v in fleet.users.iter().flat_map(|u| &u.vehicles) {
            one_day(v);
        }
    }

    fn one_day(v: &Vehicle) {
        let clock = clock();
        let mut states = std::collections::HashSet::new();
        let mut last_odo = 0.0;
        let (mut fuel_min, mut fuel_max) = (f64::MAX, 0.0f64);
        let (mut asleep, mut last_report) = (0, 0);
        // 24 simulated hours = 24 real minutes at time_scale 60; step one report (5 s).
        for i in 0..(24 * 60 * 60 / 5 + 10) {
            let at = v.report_time(&clock, clock.anchor_ms + i * 5_000);
            let s = v.state_at(&clock, at);
            assert!(s.report_ms <= at && s.report_ms >= last_report, "{s:?}");
            if s.report_ms < at {
                asleep += 1;
                // Asleep: the last report before sleep, unchanged until it wakes.
                assert_eq!(s, v.state_at(&clock, s.report_ms));
            }
            last_report = s.report_ms;
            if v.powertrain.has_battery() {
                assert!((5.0..=100.0).contains(&s.soc_percent), "{s:?}");
                assert!(s.range_km > 0.0 && s.range_km < 700.0, "{s:?}");
            } else {
                assert_eq!((s.soc_percent, s.plugged_in), (0.0, false));
            }
            assert!(s.odometer_km >= last_odo, "odometer went back: {s:?}");
            last_odo = s.odometer_km;
            if s.charge_state == ChargeState::FullyCharged {
                assert_eq!(s.soc_percent, v.charge_limit_pct);
                assert!(s.plugged_in);
            }
            assert_eq!(s.fuel.is_some(), v.powertrain.has_engine());
            assert_eq!(s.oil_life.is_some(), v.powertrain.has_engine());
            if let Some(fuel) = s.fuel {
                assert!(fuel.percent > 0.0 && fuel.percent <= 100.0, "{s:?}");
                assert!(fuel.litres <= v.tank_l && fuel.range_km > 0.0, "{s:?}");
                fuel_min = fuel_min.min(fuel.percent);
                fuel_max = fuel_max.max(fuel.percent);
            }
            if let Some(oil) = s.oil_life {
                assert!(oil > 0.0 && oil <= 1.0, "{s:?}");
            }
            for kpa in s.tire_kpa {
                assert!((220.0..=250.0).contains(&kpa), "{s:?}");
            }
            states.insert(s.charge_state.as_str());
        }
        let expected_states = if v.powertrain.has_battery() { 3 } else { 1 };
        assert_eq!(states.len(), expected_states, "{states:?}");
        if v.powertrain.has_engine() {
            assert_eq!(fuel_max, 100.0, "refuelled to full");
            assert!(fuel_min < 99.0, "the trip burns fuel: {fuel_min}");
        }
        // Parked spells of 6 h or more every day: a quarter of the reports at least.
        assert!(
            asleep > 24 * 60 * 12 / 4,
            "asleep for {asleep} of the day's reports"
        );
    }

    #[test]
    fn values_change_only_at_report_times() {
        let fleet = Fleet::generate(1, 1, 1, 5_000, &[Powertrain::Bev]);
        let v = &fleet.users[0].vehicles[0];
        let clock = clock();
        let t = v.report_time(&clock, clock.anchor_ms + 123_456);
        assert!(t <= clock.anchor_ms + 123_456 && t > clock.anchor_ms + 123_456 - 5_000);
        let mut awake = 0;
        for r in (0..2_000).map(|i| t + i * 5_000) {
            assert_eq!(v.state_now(&clock, r), v.state_now(&clock, r + 4_999));
            if v.state_now(&clock, r).report_ms == r {
                awake += 1;
            }
        }
        assert!(awake > 500, "{awake}");
    }

    #[test]
    fn powertrains_follow_the_list_and_keep_bev_fleets_stable() {
        let mixed = Fleet::generate(5, 2, 3, 5_000, &ALL);
        let kinds: Vec<Powertrain> = mixed
            .users
            .iter()
            .flat_map(|u| &u.vehicles)
            .map(|v| v.powertrain)
            .collect();
        for p in ALL {
            assert_eq!(kinds.iter().filter(|k| **k == p).count(), 2, "{kinds:?}");
        }
        // An empty list and the default both mean the all-BEV fleet with the same ids.
        let a = Fleet::generate(5, 1, 4, 5_000, &[]);
        let b = Fleet::generate(5, 1, 4, 5_000, &[Powertrain::Bev]);
        for (x, y) in a.users[0].vehicles.iter().zip(&b.users[0].vehicles) {
            assert_eq!((x.powertrain, &x.vin), (Powertrain::Bev, &y.vin));
        }
        let ice = Fleet::generate(5, 1, 4, 5_000, &[Powertrain::Ice]);
        for v in &ice.users[0].vehicles {
            assert!(v.tank_l > 0.0 && v.capacity_kwh == 0.0, "{v:?}");
        }
    }

    #[test]
    fn cars_sleep_only_when_asked() {
        let fleet = Fleet::generate(4, 1, 6, 5_000, &ALL);
        let awake = SimClock {
            sleeping: false,
            ..clock()
        };
        for v in &fleet.users[0].vehicles {
            let mut slept = 0;
            for i in 0..(24 * 60 * 12) {
                let at = v.report_time(&awake, awake.anchor_ms + i * 5_000);
                assert_eq!(v.state_at(&awake, at).report_ms, at);
                if v.state_at(&clock(), at).report_ms < at {
                    slept += 1;
                }
            }
            assert!(slept > 0, "{v:?}");
        }
    }

    #[test]
    fn frozen_time_never_sleeps() {
        let fleet = Fleet::generate(2, 1, 6, 5_000, &ALL);
        let frozen = SimClock {
            time_scale: 0.0,
            ..clock()
        };
        for v in &fleet.users[0].vehicles {
            let at = v.report_time(&frozen, frozen.anchor_ms + 10_000_000);
            assert_eq!(v.state_at(&frozen, at).report_ms, at);
        }
    }
}
