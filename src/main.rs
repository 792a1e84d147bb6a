fn main() -> std::process::ExitCode {
    let cli = upgradectl::cli::Cli::parse_or_exit();
    let level = ["warn", "info", "debug", "trace"][usize::from(cli.verbose.min(3))];
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UPGRADECTL_LOG")
                .unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: under systemd stderr is the journal, which would keep
        // the escape codes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
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
