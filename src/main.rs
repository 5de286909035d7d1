//! `vhost-user-net`: parse, set up logging, run, report the error chain.

use std::error::Error;
use std::process::ExitCode;

use clap::Parser;
use vhost_user_net::control::config::{Args, Command};
use vhost_user_net::control::server;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result: Result<(), Box<dyn Error>> = match Command::try_from(Args::parse()) {
        Ok(Command::PrintCapabilities) => {
            println!("{}", server::CAPABILITIES);
            Ok(())
        }
        Ok(Command::Stats { socket, watch }) => {
            vhost_user_net::stats::client::run(&socket, watch).map_err(Box::from)
        }
        Ok(Command::Serve(config)) => server::run(config).map_err(Box::from),
        Err(e) => Err(Box::from(e)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("error: {e}");
            let mut cause = e.source();
            while let Some(c) = cause {
                msg.push_str(&format!(": {c}"));
                cause = c.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
