fn main() -> std::process::ExitCode {
    let cli = upgradectl::cli::Cli::parse_or_exit();
    upgradectl::log::init(cli.verbose, cli.quiet);
    // Fail points armed through FAILPOINTS (only in the test build; see sys::faults).
    let _fail_points = fail::FailScenario::setup();
    let json = cli.json;
    match upgradectl::run(cli, upgradectl::output::Output::stdout(json)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let (exit, kind) = upgradectl::error::classify(&e);
            upgradectl::output::print_error(json, &e, kind, exit as u8);
            std::process::ExitCode::from(exit as u8)
        }
    }
}
