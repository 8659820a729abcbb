//! The simulated fleet: users, their vehicles, and the BEV model that says what a car reports at a
//! given moment.
//!
//! Everything here is derived from the seed, so the same seed gives the same ids, VINs and
//! vehicles across restarts. A vehicle stores only a handful of parameters, never a history: the
//! value of any signal is a pure function of (parameters, report time). That keeps 10,000
//! vehicles cheap and makes two requests in one report window answer identically.

use std::collections::HashMap;

use crate::domain::{ChargeState, UnixMillis};

/// A real EV the fleet is drawn from: make/model, plausible model years, usable battery (kWh)
/// and efficiency (km per kWh), so range and consumption are believable per car.
struct CatalogEntry {
    make: &'static str,
    model: &'static str,
    years: (i32, i32),
    capacity_kwh: f64,
    km_per_kwh: f64,
    /// World manufacturer identifier, the first three VIN characters.
    wmi: &'static str,
}

const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        make: "TESLA",
        model: "Model 3",
        years: (2019, 2025),
        capacity_kwh: 75.0,
        km_per_kwh: 6.5,
        wmi: "5YJ",
    },
    CatalogEntry {
        make: "TESLA",
        model: "Model Y",
        years: (2020, 2025),
        capacity_kwh: 75.0,
        km_per_kwh: 6.0,
        wmi: "7SA",
    },
    CatalogEntry {
        make: "VOLKSWAGEN",
        model: "ID.4",
        years: (2021, 2025),
        capacity_kwh: 77.0,
        km_per_kwh: 5.5,
        wmi: "WVG",
    },
    CatalogEntry {
        make: "HYUNDAI",
        model: "IONIQ 5",
        years: (2022, 2025),
        capacity_kwh: 77.4,
        km_per_kwh: 5.8,
        wmi: "KM8",
    },
    CatalogEntry {
        make: "FORD",
        model: "Mustang Mach-E",
        years: (2021, 2025),
        capacity_kwh: 88.0,
        km_per_kwh: 5.2,
        wmi: "3FM",
    },
    CatalogEntry {
        make: "CHEVROLET",
        model: "Bolt EV",
        years: (2019, 2023),
        capacity_kwh: 65.0,
        km_per_kwh: 6.3,
        wmi: "1G1",
    },
    CatalogEntry {
        make: "NISSAN",
        model: "LEAF",
        years: (2018, 2024),
        capacity_kwh: 40.0,
        km_per_kwh: 6.4,
        wmi: "1N4",
    },
    CatalogEntry {
        make: "KIA",
        model: "EV6",
        years: (2022, 2025),
        capacity_kwh: 77.4,
        km_per_kwh: 5.9,
        wmi: "KND",
    },
    CatalogEntry {
        make: "BMW",
        model: "i4",
        years: (2022, 2025),
        capacity_kwh: 81.0,
        km_per_kwh: 6.1,
        wmi: "WBY",
    },
    CatalogEntry {
        make: "POLESTAR",
        model: "2",
        years: (2021, 2025),
        capacity_kwh: 78.0,
        km_per_kwh: 5.6,
        wmi: "LPS",
    },
    CatalogEntry {
        make: "AUDI",
        model: "Q4 e-tron",
        years: (2022, 2025),
        capacity_kwh: 77.0,
        km_per_kwh: 5.3,
        wmi: "WAU",
    },
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

/// Length of one simulated day: parked, a trip, parked, then charging overnight.
const CYCLE_S: f64 = 86_400.0;
const DRIVE_START_S: f64 = 8.0 * 3600.0;
const PLUG_IN_S: f64 = 18.0 * 3600.0;
const SPEED_KMH: f64 = 60.0;
/// Parked drain, percent of the battery per simulated hour.
const PARKED_DRAIN_PCT_H: f64 = 0.05;
const KM_PER_MILE: f64 = 1.609_344;

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
    pub(crate) capacity_kwh: f64,
    km_per_kwh: f64,
    /// Charge limit, percent.
    pub(crate) charge_limit_pct: f64,
    charger_kw: f64,
    trip_km: f64,
    base_odometer_km: f64,
    home: (f64, f64),
    /// Compass bearing of the daily trip, degrees.
    trip_bearing: f64,
    /// Where in the daily cycle this car is at the simulation's start, simulated seconds.
    phase_s: f64,
    /// Offset of this car's report grid, ms in [0, report_interval).
    report_offset_ms: i64,
}

/// What a vehicle reports at one report time, already rounded the way it is served.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct VehicleState {
    /// Unix ms of the report (`sc-data-age`, `oemUpdatedAt`).
    pub(crate) report_ms: UnixMillis,
    /// 0–100, 2 decimals.
    pub(crate) soc_percent: f64,
    /// Kilometres, 1 decimal.
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
}

/// The clock the model runs on: which real instant is simulated time zero and how fast it runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SimClock {
    pub(crate) anchor_ms: UnixMillis,
    pub(crate) time_scale: f64,
    pub(crate) report_interval_ms: i64,
}

impl Vehicle {
    fn generate(seed: u64, index: u64, report_interval_ms: i64) -> Vehicle {
        let mut rng = SeedRng::new(seed, 2, index);
        let id = rng.uuid();
        let entry = &CATALOG[rng.below(CATALOG.len() as u64) as usize];
        let year = entry.years.0 + rng.below((entry.years.1 - entry.years.0 + 1) as u64) as i32;
        let vin = make_vin(entry.wmi, year, &mut rng);
        let charge_limit_pct = [80.0, 80.0, 90.0, 100.0][rng.below(4) as usize];
        let charger_kw = [7.4, 11.0][rng.below(2) as usize];
        // At most half the battery per trip, so the state of charge stays plausible.
        let max_trip = 0.5 * entry.capacity_kwh * entry.km_per_kwh;
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
        Vehicle {
            id,
            vin,
            make: entry.make,
            model: entry.model,
            year,
            capacity_kwh: entry.capacity_kwh,
            km_per_kwh: entry.km_per_kwh,
            charge_limit_pct,
            charger_kw,
            trip_km,
            base_odometer_km,
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

    /// The model: a simulated day of parked → driving → parked → charging, which ends where it
    /// started (at the charge limit), so no history is needed to know any moment's values.
    pub(crate) fn state_at(&self, clock: &SimClock, report_ms: UnixMillis) -> VehicleState {
        let elapsed_real_s = ((report_ms - clock.anchor_ms).max(0)) as f64 / 1000.0;
        let sim_s = elapsed_real_s * clock.time_scale + self.phase_s;
        let cycles = (sim_s / CYCLE_S).floor();
        let t = sim_s - cycles * CYCLE_S;

        let pct_per_km = 100.0 / (self.capacity_kwh * self.km_per_kwh);
        let drive_s = self.trip_km / SPEED_KMH * 3600.0;
        let drive_end = DRIVE_START_S + drive_s;
        let limit = self.charge_limit_pct;
        let drain = |seconds: f64| PARKED_DRAIN_PCT_H * seconds / 3600.0;
        let soc_at_plug_in =
            limit - drain(DRIVE_START_S) - self.trip_km * pct_per_km - drain(PLUG_IN_S - drive_end);
        let deficit = limit - soc_at_plug_in;
        // Fast enough to always reach the limit before the day ends.
        let charge_pct_h = (self.charger_kw / self.capacity_kwh * 100.0).max(deficit / 5.0);

        let mut km_today = 0.0;
        let mut plugged_in = false;
        let mut charge_state = ChargeState::NotCharging;
        let mut minutes_to_complete = 0;
        let mut charge_power_kw = 0.0;
        let soc;
        if t < DRIVE_START_S {
            soc = limit - drain(t);
        } else if t < drive_end {
            km_today = (t - DRIVE_START_S) / 3600.0 * SPEED_KMH;
            soc = limit - drain(DRIVE_START_S) - km_today * pct_per_km;
        } else if t < PLUG_IN_S {
            km_today = self.trip_km;
            soc = limit - drain(DRIVE_START_S) - self.trip_km * pct_per_km - drain(t - drive_end);
        } else {
            km_today = self.trip_km;
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
        let soc_percent = round_to(soc.clamp(0.0, 100.0), 2);
        let range_km = round_to(soc_percent / 100.0 * self.capacity_kwh * self.km_per_kwh, 1);
        let odometer_km = round_to(self.base_odometer_km + cycles * self.trip_km + km_today, 1);

        // The trip goes out and comes back along one bearing.
        let driving = t >= DRIVE_START_S && t < drive_end;
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
    ) -> Fleet {
        let mut all = Vec::with_capacity(users);
        for u in 0..users {
            let id = SeedRng::new(seed, 1, u as u64).uuid();
            let vehicles = (0..vehicles_per_user)
                .map(|v| {
                    Vehicle::generate(seed, (u * vehicles_per_user + v) as u64, report_interval_ms)
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

    /// The vehicle and the index of the user owning it.
    pub(crate) fn vehicle(&self, id: &str) -> Option<(usize, &Vehicle)> {
        let &(ui, vi) = self.vehicle_index.get(id)?;
        Some((ui, &self.users[ui].vehicles[vi]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> SimClock {
        SimClock {
            anchor_ms: 1_700_000_000_000,
            time_scale: 60.0,
            report_interval_ms: 5_000,
        }
    }

    #[test]
    fn same_seed_same_fleet_and_different_seed_differs() {
        let a = Fleet::generate(7, 3, 2, 5_000);
        let b = Fleet::generate(7, 3, 2, 5_000);
        let c = Fleet::generate(8, 3, 2, 5_000);
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
        let fleet = Fleet::generate(1, 2, 3, 5_000);
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
        let fleet = Fleet::generate(3, 4, 3, 5_000);
        for v in fleet.users.iter().flat_map(|u| &u.vehicles) {
            one_day(v);
        }
    }

    fn one_day(v: &Vehicle) {
        let clock = clock();
        let mut states = std::collections::HashSet::new();
        let mut last_odo = 0.0;
        // 24 simulated hours = 24 real minutes at time_scale 60; step one report (5 s).
        for i in 0..(24 * 60 * 60 / 5 + 10) {
            let s = v.state_at(&clock, clock.anchor_ms + i * 5_000);
            assert!((5.0..=100.0).contains(&s.soc_percent), "{s:?}");
            assert!(s.range_km > 0.0 && s.range_km < 700.0, "{s:?}");
            assert!(s.odometer_km >= last_odo, "odometer went back: {s:?}");
            last_odo = s.odometer_km;
            if s.charge_state == ChargeState::FullyCharged {
                assert_eq!(s.soc_percent, v.charge_limit_pct);
                assert!(s.plugged_in);
            }
            states.insert(s.charge_state.as_str());
        }
        assert_eq!(states.len(), 3, "{states:?}");
    }

    #[test]
    fn values_change_only_at_report_times() {
        let fleet = Fleet::generate(1, 1, 1, 5_000);
        let v = &fleet.users[0].vehicles[0];
        let clock = clock();
        let t = v.report_time(&clock, clock.anchor_ms + 123_456);
        assert!(t <= clock.anchor_ms + 123_456 && t > clock.anchor_ms + 123_456 - 5_000);
        assert_eq!(v.state_now(&clock, t), v.state_now(&clock, t + 4_999));
        assert_eq!(v.state_now(&clock, t + 5_000).report_ms, t + 5_000);
    }
}
