'use strict';
// A Node.js client of the training service, as a team outside Python would write one: it loads
// proto/stepstream/v1/trainer.proto with @grpc/proto-loader (no generated code), builds its job in
// JavaScript, and reads the rich error details (google.rpc.Status -> google.rpc.BadRequest) from
// the grpc-status-details-bin trailer with protobufjs and google-proto-files' google/rpc protos.
//
// Run: STEPSTREAM_ADDRESS=host:port node --test tests/clients/node/
// (tests/clients/test_node.py starts a server and does this; scripts/install-node installs the
// packages.) Every call has a deadline and every test a timeout, so nothing can hang.

const assert = require('node:assert/strict');
const path = require('node:path');
const { after, before, describe, test } = require('node:test');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const REPO = path.resolve(__dirname, '..', '..', '..');
const ADDRESS =
  process.env.STEPSTREAM_ADDRESS || process.env.TRAINER_ADDRESS || 'localhost:50051';
const CALL_SECONDS = 15; // deadline of a unary call
const TRAIN_SECONDS = 240; // deadline of watching the job to its end

// The equivalent of examples/linear_regression.yaml, written here in JavaScript.
const LINEAR_REGRESSION = {
  name: 'linear-regression',
  model: 'linear',
  loss: 'mse',
  optimizer: { name: 'gradient_descent', learning_rate: 0.6 },
  dataset: { name: 'linear', num_samples: 100 },
  training: { steps: 200, batch_size: 100, shuffle: false, seed: 1 },
};

// longs: Number turns int64 into a JavaScript number (exact below 2**53), so Number.isInteger can
// check it; enums: String gives "JOB_STATE_SUCCEEDED"; oneofs: true names the set member.
const packageDefinition = protoLoader.loadSync(
  path.join(REPO, 'proto', 'stepstream', 'v1', 'trainer.proto'),
  {
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [path.join(REPO, 'proto')],
  },
);
const { TrainerService } = grpc.loadPackageDefinition(packageDefinition).stepstream.v1;

// google.rpc.Status and its details, from the .proto files google-proto-files ships.
const GOOGLE_PROTOS = path.dirname(require.resolve('google-proto-files/package.json'));
const rpcRoot = new protobuf.Root();
rpcRoot.resolvePath = (_origin, target) => path.join(GOOGLE_PROTOS, target);
rpcRoot.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
rpcRoot.resolveAll();
const Status = rpcRoot.lookupType('google.rpc.Status');

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function unary(client, method, request, seconds = CALL_SECONDS) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline(seconds) }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

// Every message of a WatchJob stream, in order, once the server closes it.
function watchAll(client, name, seconds = TRAIN_SECONDS) {
  return new Promise((resolve, reject) => {
    const messages = [];
    const call = client.WatchJob({ name, after_seq: 0 }, { deadline: deadline(seconds) });
    call.on('data', (message) => messages.push(message));
    call.on('error', reject);
    call.on('end', () => resolve(messages));
  });
}

// The rich status of a failed call: google.rpc.Status with its Any details unpacked.
function richStatus(err) {
  assert.ok(err.metadata, `the error has no trailers: ${err}`);
  const [bin] = err.metadata.get('grpc-status-details-bin');
  assert.ok(Buffer.isBuffer(bin), `no grpc-status-details-bin trailer on: ${err.message}`);
  const status = Status.decode(bin);
  const details = status.details.map((any) => {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    return { type: typeName, value: rpcRoot.lookupType(typeName).decode(any.value) };
  });
  return { code: status.code, message: status.message, details };
}

// CreateJob with `specJson`, which must be refused with INVALID_ARGUMENT; its field violations.
async function refused(client, specJson) {
  const err = await unary(client, 'CreateJob', { spec_json: specJson }).then(
    (job) => assert.fail(`CreateJob accepted ${specJson} as ${job.name}`),
    (e) => e,
  );
  assert.equal(err.code, grpc.status.INVALID_ARGUMENT, `${err.code}: ${err.details}`);
  const status = richStatus(err);
  assert.equal(status.code, 3); // google.rpc.Code.INVALID_ARGUMENT
  const info = status.details.find((d) => d.type === 'google.rpc.ErrorInfo');
  assert.ok(info, `no ErrorInfo in ${JSON.stringify(status)}`);
  assert.equal(info.value.domain, 'stepstream');
  const bad = status.details.find((d) => d.type === 'google.rpc.BadRequest');
  assert.ok(bad, `no BadRequest in ${JSON.stringify(status)}`);
  const violations = bad.value.field_violations;
  assert.ok(violations.length > 0, 'BadRequest has no field violations');
  for (const v of violations) {
    assert.ok(v.description, `violation of ${v.field} has no description`);
  }
  return violations;
}

describe('TrainerService from Node.js', { timeout: (TRAIN_SECONDS + 60) * 1000 }, () => {
  let client;

  before(async () => {
    client = new TrainerService(ADDRESS, grpc.credentials.createInsecure());
    await new Promise((resolve, reject) =>
      client.waitForReady(deadline(CALL_SECONDS), (err) => {
        if (err) reject(new Error(`no server at ${ADDRESS} (STEPSTREAM_ADDRESS): ${err.message}`));
        else resolve();
      }),
    );
  });

  after(() => client && client.close());

  const trainTimeout = { timeout: (TRAIN_SECONDS + 30) * 1000 };
  test('trains the linear regression and streams every step', trainTimeout, async () => {
    const job = await unary(client, 'CreateJob', {
      spec_json: JSON.stringify(LINEAR_REGRESSION),
      request_id: `node-${process.pid}-${Date.now()}`,
    });
    assert.match(job.name, /^jobs\//);
    assert.equal(job.display_name, 'linear-regression');

    const messages = await watchAll(client, job.name);
    assert.ok(messages.length >= 2, `only ${messages.length} messages`);
    assert.equal(messages[0].kind, 'snapshot', 'the first message is the snapshot');
    assert.equal(messages[0].snapshot.name, job.name);
    const events = [];
    for (const message of messages.slice(1)) {
      assert.equal(message.kind, 'batch', 'every message after the snapshot is a batch');
      events.push(...message.batch.events);
    }
    for (let i = 1; i < events.length; i++) {
      const [prev, next] = [events[i - 1].seq, events[i].seq];
      assert.ok(next > prev, `seq goes ${prev} -> ${next}`);
    }
    for (const event of events) {
      assert.ok(Number.isInteger(event.seq), `seq ${event.seq} is not an integer`);
    }

    const steps = events.filter((e) => e.payload === 'step').map((e) => e.step);
    for (const step of steps) {
      assert.ok(Number.isInteger(step.step), `step ${JSON.stringify(step.step)} is not an integer`);
      assert.ok(Number.isFinite(step.loss), `loss ${step.loss} at step ${step.step}`);
    }
    assert.deepEqual(
      steps.map((s) => s.step),
      Array.from({ length: 200 }, (_, i) => i + 1),
      'steps 1..200, each once, in order',
    );
    // Regression: a mean absolute error, no accuracy; y = 0.1x + 0.3 is fitted.
    const final = steps[steps.length - 1];
    assert.equal(typeof final.mae, 'number');
    assert.ok(final.loss < 1e-3, `final loss ${final.loss}`);

    const last = events[events.length - 1];
    assert.equal(last.payload, 'state_change', 'the stream closes after the terminal state change');
    assert.equal(last.state_change.state, 'JOB_STATE_SUCCEEDED');

    const done = await unary(client, 'GetJob', { name: job.name });
    assert.equal(done.state, 'JOB_STATE_SUCCEEDED');
    assert.ok(Number.isInteger(done.step) && done.step === 200, `job.step ${done.step}`);
    assert.ok(Number.isInteger(done.total_steps) && done.total_steps === 200);
    // JSON.parse reads 200.0 as 200 too, so the text itself must say 200: an integer stays an
    // integer on its way through the service (google.protobuf.Struct would make it 200.0).
    assert.match(done.spec_json, /"steps":\s*200[\s,}]/, done.spec_json);
    const spec = JSON.parse(done.spec_json);
    assert.ok(Number.isInteger(spec.training.steps), 'training.steps is an integer');
    assert.equal(spec.training.steps, 200);
    assert.equal(spec.training.batch_size, 100);
    assert.equal(spec.name, 'linear-regression');
    // The stored spec is canonical: shorthands expanded, aliases resolved.
    assert.equal(spec.model.architecture, 'linear');
    assert.equal(spec.loss.name, 'mean_squared_error');
    assert.equal(spec.optimizer.learning_rate, 0.6);
  });

  test('a bad spec names every bad field in the BadRequest', async () => {
    const violations = await refused(
      client,
      JSON.stringify({ modle: 'mlp', training: { steps: -1 }, dataset: 'linear' }),
    );
    const fields = violations.map((v) => v.field);
    assert.ok(fields.includes('spec.modle'), `no spec.modle in ${fields}`);
    assert.ok(fields.includes('spec.training.steps'), `no spec.training.steps in ${fields}`);
  });

  test('an empty spec is refused', async () => {
    const violations = await refused(client, '{}');
    const fields = violations.map((v) => v.field);
    assert.ok(fields.includes('spec'), `no violation of spec in ${fields}`);
  });

  test('an unknown key is refused, naming the key', async () => {
    const violations = await refused(
      client,
      JSON.stringify({ ...LINEAR_REGRESSION, colour: 'blue' }),
    );
    assert.deepEqual(
      violations.map((v) => v.field),
      ['spec.colour'],
      JSON.stringify(violations),
    );
  });

  test('spec_json that is not JSON is refused, naming spec_json', async () => {
    const violations = await refused(client, '{"name": ');
    assert.deepEqual(
      violations.map((v) => v.field),
      ['spec_json'],
      JSON.stringify(violations),
    );
  });
});
