//! The commands a person types. [`args`] is the command line (clap, parsing only; `main`
//! dispatches); [`connect`] and [`reauth`] run Smartcar Connect; [`report`], [`history`] and
//! [`plan`] read the store and need no Smartcar credentials; [`doctor`] asks Smartcar what an
//! account can do; [`poll`] polls now (through the running daemon when there is one);
//! [`admin`] copies, migrates or deletes; [`demo`] runs the simulator and the daemon in one
//! process; [`output`] is what they share for printing.

pub mod admin;
pub mod args;
pub mod connect;
pub mod demo;
pub mod doctor;
pub mod history;
pub mod output;
pub mod plan;
pub mod poll;
pub mod reauth;
pub mod report;

pub use args::{Cli, Command, StoreArgs, VehiclesCommand};
