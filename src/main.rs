//! `vhost-user-net`: parse, set up logging, run, report the error chain.

use std::process::ExitCode;

use clap::Parser;
use vhost_user_net::config::{Args, Config};
use vhost_user_net::server;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let result = Config::try_from(args)
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)
        .and_then(|config| {
            server::run(config).map_err(|e| Box::new(e) as Box<dyn std::error::Error>)
        });
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
