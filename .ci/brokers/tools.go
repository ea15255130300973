//go:build tools

// Package brokers pins the NSQ v1.3.0 server binaries that nsq_sync's tests
// and demo run against. Build them with ../build-brokers.
package brokers

import (
	_ "github.com/nsqio/nsq/apps/nsqd"
	_ "github.com/nsqio/nsq/apps/nsqlookupd"
)
