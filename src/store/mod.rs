//! STUB
#![allow(unused)]
use crate::domain::*;
pub mod queries;
#[derive(Clone)] pub struct Store;
pub type WriteObserver = std::sync::Arc<dyn Fn(&WriteReport) + Send + Sync>;
pub enum WriteItem { Reading(VehicleId, Reading), Event(PollEvent), Info(VehicleId, VehicleInfo), Vin(VehicleId, String) }
#[derive(Debug, Default, Clone)]
pub struct WriteReport { pub written: Vec<(&'static str, u64)>, pub duplicates: Vec<(&'static str, u64)>, pub dropped: Vec<(&'static str, u64)> }
impl Store {
    pub fn open(path: &std::path::Path, on_write: Option<WriteObserver>) -> anyhow::Result<Store> { todo!() }
    pub async fn call<R, F>(&self, f: F) -> anyhow::Result<R> where R: Send + 'static, F: FnOnce(&mut rusqlite::Connection) -> anyhow::Result<R> + Send + 'static { todo!() }
    pub async fn write(&self, items: Vec<WriteItem>) -> anyhow::Result<()> { todo!() }
    pub async fn flush(&self) -> anyhow::Result<()> { todo!() }
    pub async fn close(self) -> anyhow::Result<()> { todo!() }
}
