"""Everything around the mount: start-up, reload and shutdown (`daemon`), the control API
(`control`), Prometheus (`metrics`), systemd notify (`notify`), logging (`logs`) and
`vfusefs doctor` (`doctor`).  The wiring lives here; the rules live below."""
